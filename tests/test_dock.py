"""The dock in a real QGIS desktop under Xvfb: runs, re-runs from the cache, cancels, and the no-torch path.

Each test starts ``qgis --code tests/qgis_scripts/dock_*.py`` with an isolated profile; the script drives the
dock with widget calls, writes a JSON report and exits QGIS. Set CHANGESCRIBE_UPDATE_SCREENSHOTS=1 to copy the
screenshots the run takes into docs/.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
VENV_SITE = sysconfig.get_paths()["purelib"]  # the venv running pytest: torch lives here
SCREEN = "-screen 0 1600x1000x24"
JOPLIN = REPO.parent / "shared" / "data" / "joplin_geo" / "coregistered"

pytestmark = pytest.mark.skipif(shutil.which("qgis") is None or shutil.which("xvfb-run") is None,
                                reason="needs the QGIS desktop and xvfb-run (make setup installs both)")


def run_qgis(tmp_path: Path, script: str, with_torch: bool, extra_env: dict | None = None,
             timeout: int = 800) -> dict:
    plugins = tmp_path / "plugins"
    plugins.mkdir(exist_ok=True)
    link = plugins / "changescribe"
    if not link.exists():
        link.symlink_to(REPO, target_is_directory=True)
    work = tmp_path / "work"
    (tmp_path / "tmp").mkdir(exist_ok=True)
    work.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in ("QT_QPA_PLATFORM", "PYTHONPATH", "VIRTUAL_ENV")}
    env.update(QGIS_PLUGINPATH=str(plugins), CHANGESCRIBE_TEST_REPORT=str(tmp_path / "report.json"),
               CHANGESCRIBE_TEST_WORK=str(work), CHANGESCRIBE_TEST_REPO=str(REPO), TMPDIR=str(tmp_path / "tmp"),
               XDG_RUNTIME_DIR=str(tmp_path / "xdg"), PROJ_DATA="/usr/share/proj")
    # Without the venv's site-packages QGIS's Python is Debian's python3: no torch, like many user installs.
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if not p.startswith(sys.prefix))
    if with_torch:
        env["PYTHONPATH"] = VENV_SITE
    env.update(extra_env or {})
    proc = subprocess.run(["xvfb-run", "-a", "-s", SCREEN, "qgis", "--nologo", "--noversioncheck", "--noplugins",
                           "--profiles-path", str(tmp_path / "profiles"),
                           "--code", str(REPO / "tests" / "qgis_scripts" / script)],
                          env=env, capture_output=True, text=True, timeout=timeout)
    report_path = tmp_path / "report.json"
    assert report_path.exists(), f"QGIS did not run the script (rc={proc.returncode}): {proc.stderr[-3000:]}"
    report = json.loads(report_path.read_text())
    assert "error" not in report, report["error"] + proc.stderr[-3000:]
    assert not report["uncaught"], "\n".join(report["uncaught"])
    return report


def test_dock_runs_reruns_from_cache_and_cancels(tmp_path):
    r = run_qgis(tmp_path, "dock_run.py", with_torch=True)
    # the guess puts the "before" layer first although the "after" layer was added first; swap works
    assert r["guessed"] == ["sample_before", "sample_after"]
    assert r["swapped"] == ["sample_after", "sample_before"] and "reversed" in r["reversed_hint"]
    assert "EPSG:32633" in r["alignment"] and "km²" in r["alignment"]
    assert not r["env_box_visible"]
    assert "QGIS's Python on: CPU" in r["device_label"] or "CUDA" in r["device_label"]
    assert "m/px" in r["card"] and "Training data" in r["card"] and "Metrics" in r["card"]
    assert "tiles" in r["card_summary"]
    assert r["advanced_collapsed"]

    run1 = r["run1"]
    assert run1["finished"] and not run1["error"] and not run1["cancelled"], run1
    assert run1["result"]["tiles"] > 0 and not run1["result"]["reused_probability"]
    assert r["run1_layer"]["renderer"] == "graduatedSymbol"
    assert len(r["cache_after_run1"]) == 1 and r["cache_after_run1"][0].startswith("probability-")

    run2 = r["run2"]
    assert run2["finished"] and not run2["error"], run2
    assert run2["result"]["reused_probability"] and run2["result"]["tiles"] == 0  # no second inference
    assert "re-used the cached probability map" in r["summary"]
    layer = r["run2_layer"]
    assert layer["features"] > 0 and layer["features"] == run2["result"]["regions"]
    assert layer["renderer"] == "graduatedSymbol" and layer["attr"] == "mean_prob"
    assert all(c.strip() for c in layer["captions"])
    assert "caption" in layer["map_tip"]
    assert layer["abstract"] == run2["result"]["scene_caption"] == r["scene_caption_widget"] == r["clipboard"]
    assert r["caption_read_only"]
    assert "|layername=change_regions" in layer["source"]
    assert str(tmp_path / "work" / "out") in layer["source"]
    assert r["table_rows"] == layer["features"]
    assert sorted(r["table_captions"]) == sorted(layer["captions"])
    assert r["table_flags"] == layer["flags"] and r["table_marks"] == sum(1 for f in layer["flags"] if f)
    flagged = run2["result"]["flagged"]  # the run's count, in the dock's result message
    assert flagged == r["table_marks"] and ("flagged caption" in r["run2_status"]) == (flagged > 0)
    assert r["run2_layer_id"] in r["group_layer_ids"]
    children = dict(r["group_children"])
    assert any(name.endswith("change probability") and not visible for name, visible in children.items())
    assert r["selected_from_table"][0] == [r["selected_from_table"][1]]
    assert r["selected_from_layer"][0] == [r["selected_from_layer"][1]]
    assert r["zoomed"]
    assert {"dock.png", "map.png", "qgis_window.png"} <= set(r["screenshots"])

    assert r["cancel_started"] and r["cancel_saw_progress"] and r["cancel_finished"]
    assert r["cancel_outcome"]["cancelled"] and not r["cancel_outcome"]["error"]
    assert r["cancel_seconds"] < 5.0, r["cancel_seconds"]
    assert "Cancelled" in r["cancel_status"]
    assert r["cancel_new_layers"] == [] and r["cancel_new_files"] == [] and r["cancel_new_temp"] == []
    assert r["run_enabled_after_cancel"]


def test_dock_without_torch_offers_the_worker_and_runs_through_it(tmp_path):
    from changescribe.training.synthetic import write_pair

    pair = write_pair(tmp_path / "pair", name="site_2019", size=192, seed=5)
    later = pair.after.with_name("site_2021_after.tif")
    pair.after.rename(later)
    r = run_qgis(tmp_path, "dock_worker.py", with_torch=False,
                 extra_env={"CHANGESCRIBE_TEST_BEFORE": str(pair.before), "CHANGESCRIBE_TEST_AFTER": str(later),
                            "CHANGESCRIBE_TEST_PYTHON": sys.executable})
    assert r["torch_importable"] is False
    assert r["env_visible"] and r["env_text"].startswith("PyTorch is not installed in QGIS's Python")
    assert "separate Python environment" in r["env_text"]
    assert r["env_buttons"] == ["Use a separate Python…", "Create one…"]
    assert not r["run_enabled_without_torch"]
    assert "EPSG:32633" in r["alignment"]  # rasterio-only preview works without torch
    assert r["models"]  # cards are read without torch
    assert sys.executable in r["device_label_worker"] and "CPU" in r["device_label_worker"]
    run = r["run"]
    assert run["finished"] and not run["error"], run
    assert run["result"]["tiles"] > 0
    assert r["layer_in_group"] and r["table_rows"] == r["features"] == run["result"]["regions"]
    assert r["running_device_label"].startswith("Running in the separate Python")
    aoi = r["aoi_run"]
    assert aoi["finished"] and not aoi["error"], aoi
    assert any("limited to the area of interest" in line for line in aoi["result"]["alignment"])
    assert aoi["result"]["tiles"] > 0  # another area: another probability map, not the cached one
    # the cache holds the last inputs only: the earlier map was removed when the new one was made
    assert len(r["cache_before_aoi"]) == len(r["cache_after_aoi"]) == 1
    assert r["cache_before_aoi"] != r["cache_after_aoi"]
    assert r["suggestion_started"] and r["worker_suggestion"], r["worker_suggestion_status"]  # issue 14.7
    assert not r["torch_loaded_in_qgis"]
    assert r["bad_python_error"] and "cannot start" in r["bad_python_error"]
    assert r["unloaded"] and not r["dock_after_unload"] and not r["action_after_unload"]


@pytest.mark.parametrize("text, date", [("S2_20190501_T32", (2019, 5, 1)), ("ortho 2021-07-14", (2021, 7, 14)),
                                        ("city_2019_06", (2019, 6, 0)), ("mosaic 2018", (2018, 0, 0)),
                                        ("tile_123456", None), ("epsg32633", None)])
def test_dates_are_found_in_names(text, date):
    from changescribe.plugin.dock_widgets_inputs import find_date

    assert find_date(text) == date


def test_before_after_guess_prefers_dates_then_words():
    from changescribe.plugin.dock_widgets_inputs import find_role, order, time_hint

    assert find_role("site_pre_event") == "before" and find_role("Post-flood") == "after"
    assert find_role("prepared_mosaic") is None and find_role("before_after") is None
    assert order(time_hint("area_2021"), time_hint("area_2019")) == 1
    assert order(time_hint("img_20190501"), time_hint("img_20190430")) == 1
    assert order(time_hint("old_2021"), time_hint("new_2019")) == 1  # dates win over words
    assert order(time_hint("sample_before"), time_hint("sample_after")) == -1
    assert order(time_hint("2019"), time_hint("20190601")) == 0  # same year, one undated: cannot tell
    assert order(time_hint("a"), time_hint("b")) == 0


def test_every_algorithm_has_help_and_no_double_negative(qgis_app):
    from changescribe.plugin.provider import ChangeScribeProvider

    provider = ChangeScribeProvider()
    provider.loadAlgorithms()
    algs = provider.algorithms()
    assert len(algs) >= 3
    for alg in algs:
        assert alg.helpUrl().endswith("README.md#using-it") and alg.shortHelpString(), alg.name()
        assert "never reported" not in alg.shortHelpString()


def test_eta_text():
    from changescribe.plugin.dock import eta_text

    assert eta_text(1.0, 0.5) == "" and eta_text(10.0, 0.01) == ""
    assert eta_text(10.0, 0.5) == "about 10 s left" and eta_text(60.0, 0.25) == "about 3 min left"


def test_results_never_go_into_the_plugin_folder(tmp_path):
    from changescribe.plugin.paths import PLUGIN_DIR
    from changescribe.plugin.settings import _inside

    assert _inside(PLUGIN_DIR / "out", PLUGIN_DIR) and _inside(PLUGIN_DIR, PLUGIN_DIR)
    assert not _inside(tmp_path / "ChangeScribe", PLUGIN_DIR)


def test_dock_reads_at_its_default_width(tmp_path):
    """Issue 14: nothing is cut off at the width QGIS gives a new dock, with Annotate folded or open."""
    # a real pair when this machine has one (../shared/data), else the sample pair
    real = [JOPLIN / "chip0_pre.tif", JOPLIN / "chip0_post.tif"]
    extra = ({"CHANGESCRIBE_TEST_BEFORE": str(real[0]), "CHANGESCRIBE_TEST_AFTER": str(real[1])}
             if all(p.exists() for p in real) else {})
    r = run_qgis(tmp_path, "dock_layout.py", with_torch=True, extra_env=extra)
    assert r["run"]["finished"] and not r["run"]["error"], r["run"]
    # issue 14.4: the alignment line says that border fill is no data, and follows the switch
    assert "declare no NoData: black/white border fill is no data" in r["alignment"], r["alignment"]
    assert "fill is read as image" in r["alignment_fill_off"]
    assert any("black/white fill along its border is no data" in line for line in r["run"]["result"]["alignment"])
    assert r["dock_width"] == r["width_after_run"] == r["open_width"] < 360, r  # never widened to fit
    for state in ("folded", "open"):
        facts = r[state]
        assert facts["cut"] == [] and facts["hscroll"] == 0 and facts["inner"] <= facts["viewport"], (state, facts)
    assert {"dock_folded.png", "dock_open.png", "dock.png", "map.png"} <= set(r["screenshots"])
    if os.environ.get("CHANGESCRIBE_UPDATE_SCREENSHOTS"):
        for name in ("dock.png", "map.png"):
            shutil.copyfile(tmp_path / "work" / "shots" / name, REPO / "docs" / name)
    # issue 14.8/14.9: the Raster-menu dialog starts from the dock's pair, never one layer twice, and has Help
    before_id, after_id = r["pair_ids"]
    assert r["dialog_parameters"]["BEFORE"] == before_id and r["dialog_parameters"]["AFTER"] == after_id
    assert r["dialog_parameters"]["MODEL_FILE"].endswith(".json")
    assert r["dialog_values"]["BEFORE"] == before_id and r["dialog_values"]["AFTER"] == after_id, r["dialog_values"]
    assert r["help_url"].startswith("file://") and r["help_url"].endswith("README.md#using-it")
    assert r["guessed_parameters"] == {"BEFORE": before_id, "AFTER": after_id}
    assert r["one_raster_parameters"] == {}


def test_annotate_stores_what_it_shows_and_never_carries_a_class_silently(tmp_path):
    """Issue 14.5/14.6: "No change here" replaces the caption shown and stored; the class resets after a save
    unless "Keep the class" is ticked."""
    from changescribe.core.annotations import NO_CHANGE_CAPTION

    r = run_qgis(tmp_path, "annot_choices.py", with_torch=True, timeout=400)
    assert r["created"] and r["suggested1"] and r["box1"] == r["suggested1"], r
    assert r["box_no_change"] == NO_CHANGE_CAPTION and r["read_only_no_change"]
    assert not r["class_enabled_no_change"]
    assert r["box_unticked"] == r["suggested1"]  # unticking brings the suggestion back
    assert r["saved1"] and r["saved2"] and r["saved3"] and r["saved4"], r
    assert r["class_after1"] == "" and r["class_after2"] == "" and r["box_after2"] == ""
    assert r["class_after3"] == "water"
    stored = r["stored"]
    assert stored[0][:3] == [NO_CHANGE_CAPTION, None, True] and stored[0][3] == r["suggested1"]
    assert stored[1][:3] == ["a road is built", "road", False]
    assert stored[2][:3] == ["a pond appears", "water", False]
    assert stored[3][:3] == ["another pond appears", "water", False]
