"""Inside a real QGIS desktop whose Python imports torch: what the Annotate panel stores is what it shows.

Ticking *No change here* replaces the caption shown (and stored) with core's no-change caption, unticking brings
the typed one back; the class goes back to "not classified" after each save unless *Keep the class* is ticked.
Writes a JSON report and exits QGIS.
"""

import os
import sys

sys.path.insert(0, os.path.join(os.environ["CHANGESCRIBE_TEST_REPO"], "tests", "qgis_scripts"))

from dock_helpers import WORK, add_raster, finish, open_dock, pump, wait_until  # noqa: E402
from qgis.core import QgsGeometry, QgsRectangle  # noqa: E402
from qgis.PyQt.QtCore import QTimer  # noqa: E402
from qgis.utils import iface  # noqa: E402


def body(report):
    from changescribe.core.annotations import read_annotations
    from changescribe.training.synthetic import write_pair

    files = write_pair(WORK / "pair", "choice", size=256, seed=7, change_level=0.8)
    plugin, dock = open_dock()
    before = add_raster(files.before, "choice_before")
    add_raster(files.after, "choice_after")
    pump(0.5)
    canvas = iface.mapCanvas()
    canvas.setDestinationCrs(before.crs())
    canvas.setExtent(before.extent())
    pump(0.3)
    panel = dock.annotate
    dock.annotate_box.setCollapsed(False)
    report["created"] = panel.new_store(WORK / "choices.gpkg")
    ext = before.extent()

    def area(i):
        f = 0.1 + 0.2 * i
        rect = QgsRectangle(ext.xMinimum() + ext.width() * f, ext.yMinimum() + ext.height() * f,
                            ext.xMinimum() + ext.width() * (f + 0.15), ext.yMinimum() + ext.height() * (f + 0.15))
        panel.set_area(QgsGeometry.fromRect(rect))
        return wait_until(lambda: panel.task is None, 300)

    def cls():
        return panel.class_combo.currentData()

    # 1. a suggestion in place, a class picked, then "No change here": shown and stored agree
    report["suggested1"] = area(0) and panel.suggested
    report["box1"] = panel.caption_edit.toPlainText()
    panel.class_combo.setCurrentIndex(panel.class_combo.findData("building"))
    panel.no_change_check.setChecked(True)
    report["box_no_change"] = panel.caption_edit.toPlainText()
    report["read_only_no_change"] = panel.caption_edit.isReadOnly()
    report["class_enabled_no_change"] = panel.class_combo.isEnabled()
    panel.no_change_check.setChecked(False)
    report["box_unticked"] = panel.caption_edit.toPlainText()
    panel.no_change_check.setChecked(True)
    report["saved1"] = panel.save()
    report["class_after1"] = cls()
    # 2. a class is not carried over to the next area
    area(1)
    panel.class_combo.setCurrentIndex(panel.class_combo.findData("road"))
    panel.caption_edit.setPlainText("a road is built")
    report["saved2"] = panel.save()
    report["class_after2"] = cls()
    report["box_after2"] = panel.caption_edit.toPlainText()
    # 3. ... unless the analyst keeps it deliberately
    area(2)
    panel.keep_class_check.setChecked(True)
    panel.class_combo.setCurrentIndex(panel.class_combo.findData("water"))
    panel.caption_edit.setPlainText("a pond appears")
    report["saved3"] = panel.save()
    report["class_after3"] = cls()
    area(3)
    panel.caption_edit.setPlainText("another pond appears")
    report["saved4"] = panel.save()
    report["stored"] = [[r.caption, r.change_class, bool(r.no_change), r.suggested_caption]
                        for r in read_annotations(WORK / "choices.gpkg").itertuples()]


QTimer.singleShot(300, lambda: finish({}, body))
