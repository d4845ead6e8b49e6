"""The plugin object QGIS creates: a toolbar button and menu entry that toggle the dock, and the Processing
provider (the algorithm dialog stays reachable from the toolbox and the Raster menu).

Glue only: everything that computes lives in ``core/``; the dock is built on first use, so QGIS start-up
imports nothing heavy.
"""

from __future__ import annotations

import sys

from qgis.core import QgsApplication
from qgis.PyQt.QtCore import Qt
from qgis.PyQt.QtGui import QIcon
from qgis.PyQt.QtWidgets import QAction

from .paths import ICON

MENU = "&ChangeScribe"


def keep_triton_out_of_qgis() -> None:
    """Stop torch from loading Triton inside QGIS.

    Triton's extension carries its own LLVM, and QGIS usually has the system's libLLVM loaded already (Mesa's
    OpenGL drivers, e.g. llvmpipe under Xvfb): loading both crashes QGIS (segfault when torchvision → torch._dynamo
    probes for Triton). ChangeScribe never uses torch.compile, the only user of Triton, so torch simply sees
    Triton as absent. A worker process (separate Python) is not affected and keeps Triton.
    """
    if "triton" not in sys.modules:
        sys.modules["triton"] = None  # type: ignore[assignment]  # "import triton" now raises ImportError


class ChangeScribePlugin:
    """Registers the UI entry points; heavy modules are imported only when used."""

    def __init__(self, iface):
        keep_triton_out_of_qgis()
        self.iface = iface
        self.provider = None
        self.action: QAction | None = None
        self.dialog_action: QAction | None = None
        self.dock = None

    def initProcessing(self) -> None:  # noqa: N802 (QGIS's name)
        from .provider import ChangeScribeProvider

        self.provider = ChangeScribeProvider()
        QgsApplication.processingRegistry().addProvider(self.provider)

    def initGui(self) -> None:  # noqa: N802
        from .settings import export_model_folder

        export_model_folder()
        self.initProcessing()
        self.action = QAction(QIcon(ICON), "ChangeScribe: detect changes…", self.iface.mainWindow())
        self.action.setObjectName("changescribe_detect")
        self.action.setToolTip("Compare a before and an after raster: change polygons and captions")
        self.action.setCheckable(True)
        self.action.toggled.connect(self.show_dock)
        self.iface.addToolBarIcon(self.action)
        self.iface.addPluginToRasterMenu(MENU, self.action)
        self.dialog_action = QAction(QIcon(ICON), "Detect and caption changes (Processing dialog)…",
                                     self.iface.mainWindow())
        self.dialog_action.setObjectName("changescribe_processing_dialog")
        self.dialog_action.triggered.connect(self.run)
        self.iface.addPluginToRasterMenu(MENU, self.dialog_action)

    def show_dock(self, visible: bool = True) -> None:
        """Create the dock on first use, then show or hide it; the action's check state follows the dock."""
        if self.dock is None:
            if not visible:
                return
            from .dock import ChangeScribeDock

            self.dock = ChangeScribeDock(self.iface, self.iface.mainWindow())
            self.iface.addDockWidget(Qt.DockWidgetArea.RightDockWidgetArea, self.dock)
            self.dock.visibilityChanged.connect(self._dock_visibility)
        self.dock.setUserVisible(visible)

    def _dock_visibility(self, visible: bool) -> None:
        if self.action is not None and self.dock is not None and self.action.isChecked() != self.dock.isUserVisible():
            self.action.blockSignals(True)
            self.action.setChecked(self.dock.isUserVisible())
            self.action.blockSignals(False)

    def unload(self) -> None:
        if self.dock is not None:
            self.dock.shutdown()
            self.iface.removeDockWidget(self.dock)
            self.dock.deleteLater()
            self.dock = None
        for action in (self.action, self.dialog_action):
            if action is not None:
                self.iface.removeToolBarIcon(action)
                self.iface.removePluginRasterMenu(MENU, action)
                action.deleteLater()
        self.action = self.dialog_action = None
        if self.provider is not None:
            QgsApplication.processingRegistry().removeProvider(self.provider)
            self.provider = None

    def processing_parameters(self) -> dict:
        """What the Processing dialog starts from: the dock's pair and settings, else the dock's guess of the
        project's before/after rasters; never one layer as both."""
        if self.dock is not None:
            return self.dock.processing_parameters()
        from .dock_widgets_inputs import guess_pair, project_rasters

        pair = guess_pair(project_rasters())
        return {"BEFORE": pair[0], "AFTER": pair[1]} if pair else {}

    def processing_dialog(self):
        """The detect-changes algorithm dialog, filled from :meth:`processing_parameters` (not yet shown)."""
        import processing

        return processing.createAlgorithmDialog("changescribe:detectchanges", self.processing_parameters())

    def run(self) -> None:
        """Open the detect-changes algorithm dialog (runs in the background, with progress and cancel)."""
        dialog = self.processing_dialog()
        if dialog is not None:
            dialog.show()
            dialog.exec_()
