"""Inside a real QGIS desktop whose Python has no torch: the dock says so, offers the worker, and runs through it."""

import importlib.util
import os
import sys

sys.path.insert(0, os.path.join(os.environ["CHANGESCRIBE_TEST_REPO"], "tests", "qgis_scripts"))

from dock_helpers import WORK, add_raster, finish, open_dock, wait_until  # noqa: E402
from qgis.core import QgsProject, QgsSettings  # noqa: E402
from qgis.PyQt.QtCore import QTimer  # noqa: E402


def body(report):
    settings = QgsSettings()
    settings.setValue("changescribe/output_folder", str(WORK / "out"))
    report["torch_importable"] = importlib.util.find_spec("torch") is not None
    plugin, dock = open_dock()
    report["env_visible"] = dock.env_box.isVisible()
    report["env_text"] = dock.env_label.text()
    report["env_buttons"] = [dock.env_settings_button.text(), dock.env_create_button.text()]
    before = add_raster(os.environ["CHANGESCRIBE_TEST_BEFORE"], "site_2019_before")
    add_raster(os.environ["CHANGESCRIBE_TEST_AFTER"], "site_2021_after")
    wait_until(lambda: dock.pair.before_layer() is not None, 5)
    report["pair"] = [dock.pair.before_layer().name(), dock.pair.after_layer().name()]
    report["run_enabled_without_torch"] = dock.run_button.isEnabled()
    report["alignment"] = dock.pair.alignment_label.text()
    report["models"] = [c["name"] for c in dock.model_panel.cards]

    # point the dock at a separate Python that has torch (the project's venv): runs go to the worker
    settings.setValue("changescribe/python", os.environ["CHANGESCRIBE_TEST_PYTHON"])
    dock.check_environment()
    wait_until(lambda: " on: CPU" in dock.device_label.text() or " on: CUDA" in dock.device_label.text(), 120)
    report["device_label_worker"] = dock.device_label.text()
    report["env_visible_with_worker"] = dock.env_box.isVisible()
    dock.model_panel.threshold_spin.setValue(0.3)
    dock.run_button.click()
    report["running_device_label"] = ""
    wait_until(lambda: dock.device_label.text().startswith("Running in") or dock.task is None, 120)
    report["running_device_label"] = dock.device_label.text()
    finished = wait_until(lambda: dock.task is None, 300)
    outcome = dock.last_outcome
    report["run"] = {"finished": finished, "error": outcome.error, "cancelled": outcome.cancelled,
                     "result": outcome.result}
    layer = dock.last_layer
    group = QgsProject.instance().layerTreeRoot().findGroup("ChangeScribe")
    report["layer_in_group"] = bool(layer and group and layer.id() in group.findLayerIds())
    report["features"] = layer.featureCount() if layer else None
    report["table_rows"] = dock.results.table.rowCount()

    # limited to the current map extent (the left half of the pair)
    from qgis.core import QgsRectangle
    from qgis.utils import iface

    e = before.extent()
    iface.mapCanvas().setDestinationCrs(before.crs())
    iface.mapCanvas().setExtent(QgsRectangle(e.xMinimum(), e.yMinimum(), e.center().x(), e.yMaximum()))
    dock.pair.aoi_combo.setCurrentIndex(1)
    cache = WORK / "out" / "cache"
    report["cache_before_aoi"] = sorted(p.name for p in cache.iterdir())
    dock.run_button.click()
    finished = wait_until(lambda: dock.task is None, 300)
    outcome = dock.last_outcome
    report["aoi_run"] = {"finished": finished, "error": outcome.error, "result": outcome.result}
    report["cache_after_aoi"] = sorted(p.name for p in cache.iterdir())
    dock.pair.aoi_combo.setCurrentIndex(0)

    # the Annotate panel's suggestion goes through the same worker (QGIS's Python has no torch here)
    from qgis.core import QgsGeometry

    from changescribe.core.suggestion import suggest_caption  # noqa: F401 (importable without torch)

    panel = dock.annotate
    panel.set_area(QgsGeometry.fromRect(QgsRectangle(e.xMinimum(), e.yMinimum(), e.center().x(), e.center().y())))
    report["suggestion_started"] = panel.task is not None
    wait_until(lambda: panel.task is None, 300)
    report["worker_suggestion"] = panel.suggested
    report["worker_suggestion_status"] = panel.status_label.text()
    report["torch_loaded_in_qgis"] = "torch" in sys.modules

    # a "Python" that cannot start: a clear line in the dock, no traceback
    settings.setValue("changescribe/python", os.path.join(os.environ["CHANGESCRIBE_TEST_REPO"], "README.md"))
    dock.check_environment()
    wait_until(lambda: dock.env_box.isVisible() and "cannot" in dock.env_label.text(), 60)
    report["bad_python_error"] = dock.env_label.text()

    # unloading removes the dock and the actions
    from qgis.PyQt.QtWidgets import QToolBar
    from qgis.utils import unloadPlugin

    report["unloaded"] = unloadPlugin("changescribe")
    wait_until(lambda: False, 0.3)
    try:
        visible = dock.isVisible()  # deleteLater may already have run: then the wrapper raises
    except RuntimeError:
        visible = False
    report["dock_after_unload"] = visible or plugin.dock is not None
    report["action_after_unload"] = "changescribe_detect" in [
        a.objectName() for tb in iface.mainWindow().findChildren(QToolBar) for a in tb.actions()]


QTimer.singleShot(300, lambda: finish({}, body))
