"""The plugin in a real QGIS desktop (under Xvfb): it loads through qgis.utils and shows its entry points."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def qgis_desktop_env(tmp_path: Path) -> dict:
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "changescribe").symlink_to(REPO, target_is_directory=True)
    env = {k: v for k, v in os.environ.items() if k not in ("QT_QPA_PLATFORM", "PYTHONPATH")}
    env.update(QGIS_PLUGINPATH=str(plugins), CHANGESCRIBE_TEST_REPORT=str(tmp_path / "report.json"),
               XDG_RUNTIME_DIR=str(tmp_path / "xdg"))
    return env


@pytest.mark.skipif(shutil.which("qgis") is None or shutil.which("xvfb-run") is None,
                    reason="needs the QGIS desktop and xvfb-run (make setup installs both)")
def test_plugin_loads_in_qgis_desktop(tmp_path):
    env = qgis_desktop_env(tmp_path)
    proc = subprocess.run(["xvfb-run", "-a", "qgis", "--nologo", "--noversioncheck", "--noplugins", "--profiles-path",
                           str(tmp_path / "profiles"), "--code", str(REPO / "tests" / "qgis_scripts" / "load_plugin.py")],
                          env=env, capture_output=True, text=True, timeout=300)
    report_path = tmp_path / "report.json"
    assert report_path.exists(), f"QGIS did not run the check (rc={proc.returncode}): {proc.stderr[-2000:]}"
    report = json.loads(report_path.read_text())
    assert "error" not in report, report["error"]
    assert report["available"] and report["loaded"] and report["started"] and report["in_plugins"]
    assert report["toolbar_action"]
    assert report["action_text"].startswith("ChangeScribe")
    assert report["provider"] and "changescribe:detectchanges" in report["algorithms"]
    # Loading the plugin must not drag torch into QGIS start-up.
    assert report["torch_loaded"] is False
    assert report["unloaded"] and not report["action_after_unload"] and not report["provider_after_unload"]
    assert proc.returncode == 0, proc.stderr[-2000:]
