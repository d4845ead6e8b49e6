"""The plugin object QGIS creates: a toolbar button, a menu entry and the Processing provider.

Glue only: everything that computes lives in ``core/``.
"""

from __future__ import annotations

from pathlib import Path

from qgis.core import QgsApplication
from qgis.PyQt.QtGui import QIcon
from qgis.PyQt.QtWidgets import QAction

PLUGIN_DIR = Path(__file__).resolve().parent.parent
ICON = str(PLUGIN_DIR / "resources" / "icons" / "changescribe.svg")
MENU = "&ChangeScribe"


class ChangeScribePlugin:
    """Registers the UI entry points; heavy modules are imported only when used."""

    def __init__(self, iface):
        self.iface = iface
        self.provider = None
        self.action: QAction | None = None

    def initProcessing(self) -> None:  # noqa: N802 (QGIS's name)
        from .provider import ChangeScribeProvider

        self.provider = ChangeScribeProvider()
        QgsApplication.processingRegistry().addProvider(self.provider)

    def initGui(self) -> None:  # noqa: N802
        self.initProcessing()
        self.action = QAction(QIcon(ICON), "ChangeScribe: detect changes…", self.iface.mainWindow())
        self.action.setObjectName("changescribe_detect")
        self.action.setToolTip("Compare a before and an after raster: change polygons and captions")
        self.action.triggered.connect(self.run)
        self.iface.addToolBarIcon(self.action)
        self.iface.addPluginToRasterMenu(MENU, self.action)

    def unload(self) -> None:
        if self.action is not None:
            self.iface.removeToolBarIcon(self.action)
            self.iface.removePluginRasterMenu(MENU, self.action)
            self.action.deleteLater()
            self.action = None
        if self.provider is not None:
            QgsApplication.processingRegistry().removeProvider(self.provider)
            self.provider = None

    def run(self) -> None:
        """Open the detect-changes algorithm dialog (runs in the background, with progress and cancel)."""
        import processing

        processing.execAlgorithmDialog("changescribe:detectchanges", {})
