"""Shared by the dock scripts that run inside a real QGIS desktop (``qgis --code``): waiting, snapshots, exit.

The scripts cannot import this as a module by package name (QGIS runs them as plain files), so they load it
with ``runpy``/``exec`` from the same folder.
"""

import json
import os
import sys
import time
import traceback
from pathlib import Path

from qgis.core import QgsApplication, QgsProject, QgsRasterLayer
from qgis.PyQt.QtWidgets import QApplication
from qgis.utils import iface, loadPlugin, plugins, startPlugin, updateAvailablePlugins

REPORT = os.environ["CHANGESCRIBE_TEST_REPORT"]
WORK = Path(os.environ["CHANGESCRIBE_TEST_WORK"])
REPO = Path(os.environ["CHANGESCRIBE_TEST_REPO"])
UNCAUGHT: list[str] = []


def _record_uncaught(etype, value, tb) -> None:
    """QGIS would show a modal traceback dialog and the test would hang: record the error instead."""
    UNCAUGHT.append("".join(traceback.format_exception(etype, value, tb)))


sys.excepthook = _record_uncaught
# A crash inside QGIS kills the process before the report is written: keep the Python stacks of all threads.
import faulthandler  # noqa: E402

_FAULTS = open(WORK / "faulthandler.txt", "w")  # noqa: SIM115 (must stay open for the process's life)
faulthandler.enable(file=_FAULTS, all_threads=True)


def pump(seconds: float) -> None:
    """Let QGIS run (tasks finish, signals arrive, the canvas renders) for a while."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        QApplication.processEvents()
        time.sleep(0.01)


def wait_until(predicate, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end and not UNCAUGHT:
        QApplication.processEvents()
        if predicate():
            return True
        time.sleep(0.01)
    return False


def files_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


def temp_entries() -> list[str]:
    """ChangeScribe's temporary files and folders in this process's temp folder (TMPDIR is ours in tests)."""
    tmp = Path(os.environ.get("TMPDIR") or "/tmp")
    return sorted(p.name for p in tmp.glob("changescribe*"))


def open_dock():
    """Load the plugin the way the Plugin Manager does and open the dock with its toolbar action."""
    updateAvailablePlugins()
    assert loadPlugin("changescribe") and startPlugin("changescribe"), "the plugin did not load"
    plugin = plugins["changescribe"]
    iface.mainWindow().findChild(type(plugin.action), "changescribe_detect").trigger()
    dock = plugin.dock
    assert dock is not None and dock.isUserVisible(), "the dock did not open"
    return plugin, dock


def add_raster(path: Path, name: str) -> QgsRasterLayer:
    layer = QgsRasterLayer(str(path), name, "gdal")
    assert layer.isValid(), path
    QgsProject.instance().addMapLayer(layer)
    return layer


def run_and_wait(dock, timeout: float = 400.0) -> dict:
    """Press Run and wait for the task to end; returns what the dock shows."""
    before = dock.runs
    dock.run_button.click()
    assert dock.runs == before + 1, f"Run did not start: {dock.status_label.text()}"
    finished = wait_until(lambda: dock.task is None, timeout)
    outcome = dock.last_outcome
    return {"finished": finished, "cancelled": outcome.cancelled if outcome else None,
            "error": outcome.error if outcome else None, "result": outcome.result if outcome else None,
            "notes": outcome.notes if outcome else None, "status": dock.status_label.text()}


def finish(report: dict, body) -> None:
    """Run ``body(report)``, record any failure, write the report, and leave QGIS without a save prompt."""
    try:
        body(report)
    except Exception:
        report["error"] = traceback.format_exc()
    report["uncaught"] = UNCAUGHT
    try:
        QgsApplication.taskManager().cancelAll()
        wait_until(lambda: QgsApplication.taskManager().countActiveTasks() == 0, 30)
    except Exception:
        report.setdefault("error", traceback.format_exc())
    with open(REPORT, "w") as f:
        json.dump(report, f, indent=1, default=str)
    QgsProject.instance().clear()
    QgsProject.instance().setDirty(False)
    iface.actionExit().trigger()
