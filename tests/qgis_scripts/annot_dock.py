"""Inside a real QGIS desktop whose Python imports torch: the dock's Annotate section end to end.

Creates a store, draws a rectangle with simulated mouse events on the canvas, waits for the model's suggested
caption (a QgsTask), corrects it, sets a class and saves (edit buffer + commit); draws a polygon and saves it as
"no change"; then refuses a read-only store. Writes a JSON report and exits QGIS.
"""

import os
import sys

sys.path.insert(0, os.path.join(os.environ["CHANGESCRIBE_TEST_REPO"], "tests", "qgis_scripts"))

from dock_helpers import WORK, add_raster, finish, open_dock, pump, wait_until  # noqa: E402
from qgis.core import QgsPointXY, QgsRectangle  # noqa: E402
from qgis.gui import QgsMapMouseEvent  # noqa: E402
from qgis.PyQt.QtCore import QEvent, QPoint, Qt, QTimer  # noqa: E402
from qgis.utils import iface  # noqa: E402


def mouse(tool, canvas, kind, point: QgsPointXY, button=Qt.LeftButton):
    px = canvas.getCoordinateTransform().transform(point)
    pos = QPoint(int(px.x()), int(px.y()))
    ev_type = {"press": QEvent.MouseButtonPress, "move": QEvent.MouseMove,
               "release": QEvent.MouseButtonRelease}[kind]
    buttons = Qt.NoButton if kind == "release" else button
    e = QgsMapMouseEvent(canvas, ev_type, pos, button if kind != "move" else Qt.NoButton, buttons)
    {"press": tool.canvasPressEvent, "move": tool.canvasMoveEvent, "release": tool.canvasReleaseEvent}[kind](e)


def body(report):
    from changescribe.core.annotations import read_annotations
    from changescribe.training.synthetic import write_pair

    files = write_pair(WORK / "pair", "annot", size=256, seed=5, change_level=0.8)
    plugin, dock = open_dock()
    before = add_raster(files.before, "annot_before")
    add_raster(files.after, "annot_after")
    pump(1.0)
    canvas = iface.mapCanvas()
    canvas.setDestinationCrs(before.crs())
    canvas.setExtent(before.extent())
    canvas.refresh()
    pump(0.5)
    panel = dock.annotate
    report["collapsed"] = dock.annotate_box.isCollapsed()
    dock.annotate_box.setCollapsed(False)
    store = WORK / "annotations.gpkg"
    report["created"] = panel.new_store(store)
    report["store_status"] = panel.status_label.text()

    ext = before.extent()
    x0, y0 = ext.xMinimum() + ext.width() * 0.3, ext.yMinimum() + ext.height() * 0.3
    x1, y1 = ext.xMinimum() + ext.width() * 0.6, ext.yMinimum() + ext.height() * 0.6
    panel.rect_button.click()
    report["tool_active"] = canvas.mapTool() is panel.tool
    tool = panel.tool
    mouse(tool, canvas, "press", QgsPointXY(x0, y0))
    mouse(tool, canvas, "move", QgsPointXY(x1, y1))
    mouse(tool, canvas, "release", QgsPointXY(x1, y1))
    report["area"] = panel.geometry.boundingBox().toString(1) if panel.geometry else None
    report["suggestion_started"] = panel.task is not None
    wait_until(lambda: panel.task is None, 300)
    report["suggested"] = panel.suggested
    report["caption_box"] = panel.caption_edit.toPlainText()
    report["suggest_status"] = panel.status_label.text()
    panel.caption_edit.setPlainText("two new houses are built in the middle")
    panel.class_combo.setCurrentIndex(panel.class_combo.findData("building"))
    report["saved1"] = panel.save()
    report["status1"] = panel.status_label.text()

    panel.poly_button.click()
    report["poly_mode"] = tool.mode
    pts = [QgsPointXY(ext.xMinimum() + ext.width() * fx, ext.yMinimum() + ext.height() * fy)
           for fx, fy in ((0.05, 0.05), (0.2, 0.05), (0.2, 0.2), (0.05, 0.2))]
    for p in pts:
        mouse(tool, canvas, "press", p)
        mouse(tool, canvas, "release", p)
    mouse(tool, canvas, "press", pts[-1], Qt.RightButton)
    mouse(tool, canvas, "release", pts[-1], Qt.RightButton)
    wait_until(lambda: panel.task is None, 300)
    panel.no_change_check.setChecked(True)
    panel.caption_edit.setPlainText("")
    panel.no_change_check.setChecked(False)
    panel.no_change_check.setChecked(True)
    report["saved2"] = panel.save()
    report["layer_editable_after"] = panel.layer.isEditable()
    anns = read_annotations(store)
    report["stored"] = [{"caption": r.caption, "suggested": r.suggested_caption, "edited": bool(r.edited),
                         "class": r.change_class, "no_change": bool(r.no_change), "before": r.before_source,
                         "model": r.model_name, "area": float(r.geometry.area)} for r in anns.itertuples()]
    report["export_params"] = {k: (v if isinstance(v, (str, int, float)) else type(v).__name__)
                               for k, v in panel.export_parameters().items()}
    ro = WORK / "ro.gpkg"
    ro.write_bytes(store.read_bytes())
    os.chmod(ro, 0o444)
    report["ro_opened"] = panel.set_store(ro)
    report["ro_status"] = panel.status_label.text()
    panel.rect_button.click()
    panel.rect_button.click()
    report["tool_released"] = canvas.mapTool() is not panel.tool
    report["extent"] = QgsRectangle(canvas.extent()).toString(1)


# run once QGIS's event loop is up: an exit triggered before it would be lost and QGIS would stay open
QTimer.singleShot(300, lambda: finish({}, body))
