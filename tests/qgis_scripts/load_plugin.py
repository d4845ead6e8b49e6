"""Run inside a real QGIS desktop (``qgis --code``): load ChangeScribe the way the Plugin Manager does."""

import json
import os
import traceback

from qgis.core import QgsApplication
from qgis.PyQt.QtCore import QTimer
from qgis.PyQt.QtWidgets import QAction, QToolBar
import qgis.utils
from qgis.utils import iface, loadPlugin, plugins, startPlugin, unloadPlugin, updateAvailablePlugins

REPORT = os.environ["CHANGESCRIBE_TEST_REPORT"]


def check():
    report = {}
    try:
        updateAvailablePlugins()  # what the Plugin Manager does: find plugins on QGIS_PLUGINPATH
        report["available"] = "changescribe" in qgis.utils.available_plugins
        report["loaded"] = loadPlugin("changescribe")
        report["started"] = startPlugin("changescribe")
        report["in_plugins"] = "changescribe" in plugins
        toolbar_actions = [a.objectName() for tb in iface.mainWindow().findChildren(QToolBar) for a in tb.actions()]
        report["toolbar_action"] = "changescribe_detect" in toolbar_actions
        raster_menu = iface.rasterMenu()
        report["raster_menu"] = [a.text() for a in raster_menu.actions()]
        action = iface.mainWindow().findChild(QAction, "changescribe_detect")
        report["action_text"] = action.text() if action else None
        registry = QgsApplication.processingRegistry()
        provider = registry.providerById("changescribe")
        report["provider"] = provider is not None
        report["algorithms"] = sorted(a.id() for a in provider.algorithms()) if provider else []
        report["torch_loaded"] = "torch" in __import__("sys").modules
        report["unloaded"] = unloadPlugin("changescribe")
        report["action_after_unload"] = "changescribe_detect" in [
            a.objectName() for tb in iface.mainWindow().findChildren(QToolBar) for a in tb.actions()]
        report["provider_after_unload"] = registry.providerById("changescribe") is not None
    except Exception:
        report["error"] = traceback.format_exc()
    with open(REPORT, "w") as f:
        json.dump(report, f)
    iface.actionExit().trigger()


QTimer.singleShot(200, check)
