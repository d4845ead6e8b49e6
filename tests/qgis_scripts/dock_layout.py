"""Inside a real QGIS desktop whose Python imports torch: the dock reads at the width QGIS gives a new dock.

Opens the dock from the toolbar (its default width, never resized), adds the sample pair, runs it, then checks
with *Annotate* folded and with every foldable box open that no visible child widget is cut off: each lies
inside the scroll area's viewport horizontally, no horizontal scroll bar is needed, and word-wrapped labels get
the height their text needs. Then the Processing dialog opened from the menu: filled from the dock's pair.
Writes a JSON report and exits QGIS.
"""

import os
import shutil
import sys

sys.path.insert(0, os.path.join(os.environ["CHANGESCRIBE_TEST_REPO"], "tests", "qgis_scripts"))

from dock_helpers import REPO, WORK, add_raster, finish, open_dock, pump, run_and_wait, wait_until  # noqa: E402
from qgis.core import QgsProject, QgsSettings  # noqa: E402
from qgis.PyQt.QtCore import QPoint, QTimer  # noqa: E402
from qgis.PyQt.QtWidgets import QAbstractButton, QAbstractScrollArea, QLabel, QWidget  # noqa: E402
from qgis.utils import iface  # noqa: E402

OUT = WORK / "out"
SHOTS = WORK / "shots"


def cut_off(dock) -> dict:
    """Visible widgets of the dock that do not fit its visible width, or labels shorter than their text."""
    scroll = dock.widget()
    view, inner = scroll.viewport(), scroll.widget()
    width = view.width()
    bad = []
    for w in inner.findChildren(QWidget):
        if not w.isVisible() or w.width() <= 0 or w.height() <= 0:
            continue
        parent, nested = w.parentWidget(), False
        while parent is not None and parent is not inner:  # the insides of a table or text box scroll by design
            nested = nested or isinstance(parent, QAbstractScrollArea)
            parent = parent.parentWidget()
        if nested:
            continue
        left = w.mapTo(view, QPoint(0, 0)).x()
        name = f"{type(w).__name__}:{w.objectName() or (w.text()[:30] if hasattr(w, 'text') else '')}"
        if left < 0 or left + w.width() > width:
            bad.append(f"{name} spans {left}..{left + w.width()} of {width}")
        elif isinstance(w, QLabel) and w.wordWrap() and w.text() and w.height() < w.heightForWidth(w.width()):
            bad.append(f"{name} is {w.height()} px high, its text needs {w.heightForWidth(w.width())}")
        elif isinstance(w, (QLabel, QAbstractButton)) and not (isinstance(w, QLabel) and w.wordWrap()) \
                and w.width() < w.minimumSizeHint().width():
            bad.append(f"{name} is {w.width()} px wide, needs {w.minimumSizeHint().width()}")
    needs = sorted(((w.mapTo(inner, QPoint(0, 0)).x() + w.minimumSizeHint().width(),
                     f"{type(w).__name__}:{w.objectName() or (w.text()[:30] if hasattr(w, 'text') else '')}")
                    for w in inner.findChildren(QWidget) if w.isVisible()), reverse=True)[:3]
    return {"viewport": width, "inner": inner.width(), "hscroll": scroll.horizontalScrollBar().maximum(),
            "cut": bad, "widest": needs}


def save_docs_screenshots(dock, after) -> None:
    """docs/dock.png (the dock's whole content at its default width) and docs/map.png (the regions over the after
    image), as the README shows them."""
    canvas = iface.mapCanvas()
    canvas.setDestinationCrs(after.crs())
    rect = after.extent()
    rect.grow(max(rect.width(), rect.height()) * 0.02)
    canvas.setExtent(rect)
    canvas.refresh()
    pump(0.5)
    canvas.waitWhileRendering()
    pump(0.3)
    canvas.saveAsImage(str(SHOTS / "map.png"))
    dock.widget().widget().grab().save(str(SHOTS / "dock.png"))
    iface.mainWindow().grab().save(str(SHOTS / "qgis_window.png"))


def body(report):
    settings = QgsSettings()
    settings.setValue("changescribe/output_folder", str(OUT))
    plugin, dock = open_dock()
    pump(0.5)
    report["dock_width"] = dock.width()
    # copies: QGIS writes statistics (.aux.xml) next to rasters it shows, and no source folder may change
    given = [os.environ.get("CHANGESCRIBE_TEST_BEFORE"), os.environ.get("CHANGESCRIBE_TEST_AFTER")]
    sources = given if all(given) else [REPO / "resources" / "sample" / f"sample_{r}.tif" for r in ("before", "after")]
    pair = WORK / "pair"
    pair.mkdir()
    copies = [pair / os.path.basename(str(p)) for p in sources]
    for src, dst in zip(sources, copies):
        shutil.copyfile(src, dst)
    before = add_raster(copies[0], copies[0].stem)
    after = add_raster(copies[1], copies[1].stem)
    wait_until(lambda: "on: " in dock.device_label.text() and "checking" not in dock.device_label.text(), 120)
    report["alignment"] = dock.pair.alignment_label.text()
    dock.model_panel.fill_check.setChecked(False)
    report["alignment_fill_off"] = dock.pair.alignment_label.text()
    dock.model_panel.fill_check.setChecked(True)
    report["run"] = run_and_wait(dock, timeout=float(os.environ.get("CHANGESCRIBE_TEST_RUN_TIMEOUT", "400")))
    pump(0.5)
    report["width_after_run"] = dock.width()
    report["folded"] = cut_off(dock)
    SHOTS.mkdir(parents=True, exist_ok=True)
    dock.grab().save(str(SHOTS / "dock_folded.png"))
    save_docs_screenshots(dock, after)
    dock.annotate_box.setCollapsed(False)
    dock.model_panel.card_box.setCollapsed(False)
    dock.model_panel.advanced.setCollapsed(False)
    pump(0.5)
    report["open"] = cut_off(dock)
    report["open_width"] = dock.width()
    dock.widget().widget().grab().save(str(SHOTS / "dock_open.png"))
    report["screenshots"] = sorted(p.name for p in SHOTS.iterdir())

    # the Processing dialog opened from the menu starts from the dock's pair, whichever layer is active
    iface.setActiveLayer(after)
    report["dialog_parameters"] = {k: (v.id() if hasattr(v, "id") else v)
                                   for k, v in plugin.processing_parameters().items()}
    report["pair_ids"] = [before.id(), after.id()]
    dialog = plugin.processing_dialog()
    values = dialog.createProcessingParameters()
    report["dialog_values"] = {k: (values[k].id() if hasattr(values.get(k), "id") else str(values.get(k)))
                               for k in ("BEFORE", "AFTER", "THRESHOLD")}
    report["help_url"] = dialog.algorithm().helpUrl()
    dialog.close()
    dialog.deleteLater()
    # without the dock's pair (an unloaded dock): the guess from the project, never one layer twice
    dock_ref, plugin.dock = plugin.dock, None
    try:
        guessed = plugin.processing_parameters()
        report["guessed_parameters"] = {k: v.id() for k, v in guessed.items()}
        QgsProject.instance().removeMapLayer(after.id())
        pump(0.2)
        report["one_raster_parameters"] = {k: v.id() for k, v in plugin.processing_parameters().items()}
    finally:
        plugin.dock = dock_ref


QTimer.singleShot(300, lambda: finish({}, body))
