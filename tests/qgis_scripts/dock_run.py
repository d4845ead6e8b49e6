"""Inside a real QGIS desktop whose Python imports torch: the dock's whole job, end to end.

Opens the dock from the toolbar, adds the sample pair, runs, re-runs with another threshold (re-using the cached
probability map), checks layer, style, captions, table and selection sync, saves screenshots, then cancels a run
on a bigger pair and checks that nothing was left behind. Writes a JSON report and exits QGIS.
"""

import os
import sys
import time

sys.path.insert(0, os.path.join(os.environ["CHANGESCRIBE_TEST_REPO"], "tests", "qgis_scripts"))

from dock_helpers import (  # noqa: E402
    REPO, WORK, add_raster, files_under, finish, open_dock, pump, run_and_wait, temp_entries, wait_until)
from qgis.core import QgsProject, QgsSettings  # noqa: E402
from qgis.PyQt.QtCore import Qt, QTimer  # noqa: E402
from qgis.utils import iface  # noqa: E402

OUT = WORK / "out"
SHOTS = WORK / "shots"


def threshold_from_cache(cache_dir):
    """When the first run found nothing (an untrained model): a threshold that the cached probability map surely
    crosses, so the test does not depend on how well the model is trained: the 80th percentile, rounded down to the spin box's 3 decimals."""
    import math

    import numpy as np
    from osgeo import gdal

    (path,) = [p for p in cache_dir.glob("probability-*.tif")]
    ds = gdal.Open(str(path))
    band = ds.GetRasterBand(1)
    values = band.ReadAsArray().astype("float64")
    nodata = band.GetNoDataValue()
    valid = values[values != nodata] if nodata is not None else values.ravel()
    return min(0.99, max(0.01, math.floor(float(np.percentile(valid, 80)) * 1000) / 1000))


def layer_facts(layer):
    feats = list(layer.getFeatures())
    return {"name": layer.name(), "features": len(feats), "renderer": layer.renderer().type(),
            "attr": getattr(layer.renderer(), "classAttribute", lambda: None)(),
            "captions": [f["caption"] for f in feats], "abstract": layer.abstract(), "map_tip": layer.mapTipTemplate(),
            "flags": sorted(f["caption_flag"] or "" for f in feats),
            "source": layer.source()}


def save_screenshots(dock, layer, area):
    SHOTS.mkdir(parents=True, exist_ok=True)
    window = iface.mainWindow()
    window.resize(1500, 950)
    window.resizeDocks([dock], [470], Qt.Orientation.Horizontal)
    canvas = iface.mapCanvas()
    # the after image under the regions (what appeared), the whole compared area for context
    root = QgsProject.instance().layerTreeRoot()
    root.findLayer(area.id()).setItemVisibilityChecked(False)
    rect = area.extent()
    rect.grow(max(rect.width(), rect.height()) * 0.02)
    canvas.setExtent(rect)
    canvas.refresh()
    pump(0.5)
    canvas.waitWhileRendering()
    pump(0.3)
    canvas.saveAsImage(str(SHOTS / "map.png"))
    dock.widget().widget().grab().save(str(SHOTS / "dock.png"))
    window.grab().save(str(SHOTS / "qgis_window.png"))
    root.findLayer(area.id()).setItemVisibilityChecked(True)


def body(report):
    settings = QgsSettings()
    settings.setValue("changescribe/output_folder", str(OUT))
    settings.setValue("changescribe/batch_size", 4)
    plugin, dock = open_dock()
    # copies: QGIS writes statistics (.aux.xml) next to rasters it shows, and the repository must stay clean
    import shutil

    sample = WORK / "sample"
    sample.mkdir()
    for name in ("sample_before.tif", "sample_after.tif"):
        shutil.copyfile(REPO / "resources" / "sample" / name, sample / name)
    add_raster(sample / "sample_after.tif", "sample_after")  # added first: the guess must still order them
    before = add_raster(sample / "sample_before.tif", "sample_before")
    pump(0.2)
    report["guessed"] = [dock.pair.before_layer().name(), dock.pair.after_layer().name()]
    dock.pair.swap()
    report["swapped"] = [dock.pair.before_layer().name(), dock.pair.after_layer().name()]
    report["reversed_hint"] = dock.pair.hint_label.text()
    dock.pair.swap()
    report["alignment"] = dock.pair.alignment_label.text()
    report["env_box_visible"] = dock.env_box.isVisible()
    wait_until(lambda: "on: " in dock.device_label.text() and "checking" not in dock.device_label.text(), 120)
    report["device_label"] = dock.device_label.text()
    report["device_items"] = [dock.model_panel.device_combo.itemText(i)
                              for i in range(dock.model_panel.device_combo.count())]
    report["card"] = dock.model_panel.card_label.text()
    report["card_summary"] = dock.model_panel.card_summary.text()
    report["advanced_collapsed"] = dock.model_panel.advanced.isCollapsed()

    # 1. a first run at the default threshold
    dock.model_panel.threshold_spin.setValue(0.5)
    dock.model_panel.min_area_spin.setValue(0.0)
    report["run1"] = run_and_wait(dock)
    report["run1_layer"] = layer_facts(dock.last_layer) if dock.last_layer else None
    report["cache_after_run1"] = files_under(OUT / "cache")

    # 2. another threshold: the cached probability map is re-used, no inference
    found = (report["run1"]["result"] or {}).get("regions", 0)
    threshold = 0.7 if found else threshold_from_cache(OUT / "cache")
    report["threshold2"] = threshold
    dock.model_panel.threshold_spin.setValue(threshold)
    dock.model_panel.probability_check.setChecked(True)
    started = time.monotonic()
    report["run2"] = run_and_wait(dock)
    report["run2_seconds"] = time.monotonic() - started
    layer = dock.last_layer
    report["run2_layer"] = layer_facts(layer)
    report["run2_status"] = dock.status_label.text()
    report["summary"] = dock.results.summary_label.text()
    report["scene_caption_widget"] = dock.results.caption_edit.toPlainText()
    report["caption_read_only"] = dock.results.caption_edit.isReadOnly()
    dock.results.copy_button.click()
    from qgis.PyQt.QtWidgets import QApplication

    report["clipboard"] = QApplication.clipboard().text()
    table = dock.results.table
    report["table_rows"] = table.rowCount()
    from changescribe.plugin.dock_widgets_results import FLAG_MARK, FLAG_ROLE

    report["table_captions"] = [table.item(r, 3).text().removeprefix(FLAG_MARK) for r in range(table.rowCount())]
    report["table_flags"] = sorted(table.item(r, 3).data(FLAG_ROLE) or "" for r in range(table.rowCount()))
    report["table_marks"] = sum(table.item(r, 3).text().startswith(FLAG_MARK) for r in range(table.rowCount()))
    root = QgsProject.instance().layerTreeRoot()
    group = root.findGroup("ChangeScribe")
    report["group_children"] = [(c.name(), c.isVisible()) for c in group.children()] if group else None
    report["group_layer_ids"] = group.findLayerIds() if group else []
    report["run2_layer_id"] = layer.id()

    # table ↔ layer selection, and click → zoom
    if table.rowCount():
        table.selectRow(0)
        report["selected_from_table"] = [layer.selectedFeatureIds(), table.fid(0)]
        last = table.fid(table.rowCount() - 1)
        layer.selectByIds([last])
        pump(0.1)
        report["selected_from_layer"] = [table.selected_fids(), last]
        extent_before = iface.mapCanvas().extent().toString()
        table.cellClicked.emit(table.rowCount() - 1, 1)
        pump(0.3)
        report["zoomed"] = iface.mapCanvas().extent().toString() != extent_before
        layer.removeSelection()
        pump(0.1)
    save_screenshots(dock, layer, before)
    report["screenshots"] = files_under(SHOTS)

    # 3. cancel a run on a bigger pair after its first progress: nothing may be left behind
    from changescribe.training.synthetic import write_pair

    big = write_pair(WORK / "big", name="big", size=1024, seed=3)
    big_before, big_after = add_raster(big.before, "big_2019"), add_raster(big.after, "big_2021")
    dock.pair.set_pair(big_before, big_after)
    dock.model_panel.batch_spin.setValue(1)
    dock.model_panel.probability_check.setChecked(False)
    layers_before = sorted(QgsProject.instance().mapLayers())
    files_before, temp_before = files_under(OUT), temp_entries()
    dock.run_button.click()
    report["cancel_started"] = dock.task is not None
    report["cancel_saw_progress"] = wait_until(lambda: dock.progress_bar.value() > 0, 300)
    report["progress_text"] = dock.status_label.text()
    clicked = time.monotonic()
    dock.cancel_button.click()
    report["cancel_finished"] = wait_until(lambda: dock.task is None, 60)
    report["cancel_seconds"] = time.monotonic() - clicked
    report["cancel_outcome"] = {"cancelled": dock.last_outcome.cancelled, "error": dock.last_outcome.error}
    pump(0.5)
    report["cancel_status"] = dock.status_label.text()
    report["cancel_new_layers"] = sorted(set(QgsProject.instance().mapLayers()) - set(layers_before))
    report["cancel_new_files"] = sorted(set(files_under(OUT)) - set(files_before))
    report["cancel_new_temp"] = sorted(set(temp_entries()) - set(temp_before))
    report["run_enabled_after_cancel"] = dock.run_button.isEnabled()


QTimer.singleShot(300, lambda: finish({}, body))
