"""The worker subprocess (``python -m changescribe.core.worker``) and the plugin's client, retries and cache.

Real processes, real rasters, real model: the worker is started with this venv's Python as the "separate
environment", finding the package through PYTHONPATH like the plugin arranges it.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from changescribe.core.api import DetectRequest
from changescribe.core.errors import Cancelled, ChangeScribeError, InputError, ModelError
from changescribe.core.run import cache_key, cache_path, prune_cache
from changescribe.training.synthetic import write_pair
from changescribe.plugin.worker_client import WorkerError, probe_python, run_worker

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return write_pair(tmp_path_factory.mktemp("pair"), name="site", size=192, seed=11)


@pytest.fixture(scope="module")
def plugin_parent(tmp_path_factory) -> Path:
    """A folder holding the package as ``changescribe`` (a link to the repository), like a plugins folder."""
    parent = tmp_path_factory.mktemp("plugins")
    (parent / "changescribe").symlink_to(REPO, target_is_directory=True)
    return parent


def start_worker(plugin_parent: Path, tmp: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PYTHONPATH=str(plugin_parent), TMPDIR=str(tmp))
    return subprocess.Popen([sys.executable, "-m", "changescribe.core.worker"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp)


def job(pair, out: Path, **extra) -> DetectRequest:
    return DetectRequest(**{"before": str(pair.before), "after": str(pair.after), "output": str(out),
                            "model": "default", "device": "cpu", "threshold": 0.3, "batch_size": 4, **extra})


def read_events(proc: subprocess.Popen, until=None) -> list[dict]:
    """Every stdout line must be a JSON object; stops after ``until(event)`` is true or at the end."""
    events = []
    for line in proc.stdout:
        events.append(json.loads(line))
        assert isinstance(events[-1], dict) and "event" in events[-1], line
        if until is not None and until(events[-1]):
            break
    return events


def test_worker_runs_one_job_and_reports_json_lines(tmp_path, pair, plugin_parent):
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    out = tmp_path / "out" / "changes.gpkg"
    aoi = {"wkt": "POLYGON((500005 4999910, 500090 4999910, 500090 4999995, 500005 4999995, 500005 4999910))",
           "crs": "EPSG:32633"}
    proc = start_worker(plugin_parent, tmp)
    proc.stdin.write(job(pair, out, probability_output=str(tmp_path / "out" / "p.tif"),
                         area_of_interest=aoi).to_json() + "\n")
    proc.stdin.flush()  # stdin stays open: closing it would cancel
    events = read_events(proc)
    proc.stdin.close()
    assert proc.wait(timeout=60) == 0, proc.stderr.read()
    kinds = [e["event"] for e in events]
    assert kinds[-1] == "result" and kinds.count("result") == 1 and "error" not in kinds
    assert {"log", "progress", "device"} <= set(kinds)
    fractions = [e["fraction"] for e in events if e["event"] == "progress"]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    result = events[-1]
    assert Path(result["output"]) == out and out.is_file()
    assert result["probability"] and Path(result["probability"]).is_file()
    assert isinstance(result["regions"], int) and result["scene_caption"] and result["summary"]
    con = sqlite3.connect(out)
    try:  # the event's count of flagged captions is the GeoPackage's
        assert result["flagged"] == con.execute("SELECT count(*) FROM change_regions WHERE caption_flag <> ''"
                                                ).fetchone()[0]
    finally:
        con.close()
    assert result["tiles"] > 0 and not result["reused_probability"] and result["device"].startswith("CPU")
    assert any("area of interest" in line for line in result["alignment"])
    assert ours(tmp) == []  # the pipeline's temporary files are gone


def test_worker_reuses_a_probability_map_without_inference(tmp_path, pair, plugin_parent):
    prob = tmp_path / "cache" / "p.tif"
    first = run_worker(sys.executable, job(pair, tmp_path / "a.gpkg", probability_output=str(prob)),
                       lambda e: None, lambda: False, plugin_parent=str(plugin_parent))
    assert first.tiles > 0 and prob.is_file()
    events: list[dict] = []
    second = run_worker(sys.executable, job(pair, tmp_path / "b.gpkg", threshold=0.6, reuse_probability=str(prob)),
                        events.append, lambda: False, plugin_parent=str(plugin_parent))
    assert second.tiles == 0 and second.reused_probability and (tmp_path / "b.gpkg").is_file()
    assert any("reusing" in e.get("message", "") for e in events)


def ours(tmp: Path) -> list[str]:
    """What is left in the worker's TMPDIR, less torch's own compile cache folder (made at import)."""
    return sorted(p.name for p in tmp.iterdir() if not p.name.startswith("torchinductor_"))


def _assert_nothing_left(out_dir: Path, tmp: Path) -> None:
    assert not out_dir.exists() or sorted(p.name for p in out_dir.rglob("*")) == []
    assert ours(tmp) == []


@pytest.mark.parametrize("how", ["cancel-line", "close-stdin", "sigterm"])
def test_worker_cancel_leaves_nothing_behind(tmp_path, plugin_parent, how):
    pair = write_pair(tmp_path / "pair", name="big", size=256, seed=2)
    tmp, out_dir = tmp_path / "tmp", tmp_path / "out"
    tmp.mkdir()
    out_dir.mkdir()
    proc = start_worker(plugin_parent, tmp)
    proc.stdin.write(job(pair, out_dir / "c.gpkg", tile_size=64, batch_size=1,
                         probability_output=str(out_dir / "c.tif")).to_json() + "\n")
    proc.stdin.flush()
    read_events(proc, until=lambda e: e["event"] == "progress" and e["message"].startswith("tile"))
    if how == "cancel-line":
        proc.stdin.write("cancel\n")
        proc.stdin.flush()
    elif how == "close-stdin":
        proc.stdin.close()
    else:
        proc.send_signal(signal.SIGTERM)
    rest = read_events(proc)
    rc = proc.wait(timeout=30)
    assert rc != 0
    assert rest and rest[-1]["event"] == "error" and rest[-1]["kind"] == "cancelled", rest[-3:]
    assert not any(e["event"] == "result" for e in rest)
    _assert_nothing_left(out_dir, tmp)


def test_client_cancel_stops_quickly_and_cleans_up(tmp_path, plugin_parent):
    pair = write_pair(tmp_path / "pair", name="big", size=256, seed=4)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    started = threading.Event()

    def on_event(e: dict) -> None:
        if e["event"] == "progress" and e["message"].startswith("tile"):
            started.set()

    with pytest.raises(Cancelled):
        run_worker(sys.executable, job(pair, out_dir / "c.gpkg", tile_size=64, batch_size=1), on_event,
                   started.is_set, plugin_parent=str(plugin_parent))
    assert started.is_set()
    assert sorted(out_dir.iterdir()) == []


def test_worker_bad_input_is_one_error_line(tmp_path, pair, plugin_parent):
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    proc = start_worker(plugin_parent, tmp)
    proc.stdin.write(json.dumps({**job(pair, tmp_path / "x.gpkg").to_dict(), "before": str(tmp_path / "missing.tif")})
                     + "\n")
    proc.stdin.flush()
    events = read_events(proc)
    assert proc.wait(timeout=60) == 2
    assert events[-1]["event"] == "error" and events[-1]["kind"] == "input"
    message = events[-1]["message"]
    assert "before raster not found" in message and "\n" not in message and "Traceback" not in message
    assert not (tmp_path / "x.gpkg").exists()
    with pytest.raises(InputError, match="before raster not found") as info:
        run_worker(sys.executable, DetectRequest(before=str(tmp_path / "missing.tif"), after=str(pair.after),
                                                 output=str(tmp_path / "x.gpkg"), device="cpu"),
                   lambda e: None, lambda: False, plugin_parent=str(plugin_parent))
    assert info.value.kind == "input"


def test_worker_rejects_a_job_that_is_not_json(tmp_path, plugin_parent):
    proc = start_worker(plugin_parent, tmp_path)
    out, _ = proc.communicate("not json\n", timeout=60)
    assert proc.returncode == 2
    (event,) = [json.loads(line) for line in out.splitlines()]
    assert event["event"] == "error" and event["kind"] == "job"


def test_worker_unknown_model_and_missing_cuda_are_clear_errors(tmp_path, pair, plugin_parent):
    with pytest.raises(ModelError, match="no-such-model") as info:
        run_worker(sys.executable, job(pair, tmp_path / "m.gpkg", model="no-such-model"), lambda e: None,
                   lambda: False, plugin_parent=str(plugin_parent))
    assert info.value.kind == "model"
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(ChangeScribeError, match="CUDA was requested"):
            run_worker(sys.executable, job(pair, tmp_path / "c.gpkg", device="cuda"), lambda e: None,
                       lambda: False, plugin_parent=str(plugin_parent))


def test_probe_reports_torch_and_devices(plugin_parent):
    info = probe_python(sys.executable, str(plugin_parent))
    import torch

    assert info["torch"] == torch.__version__ and info["missing"] == []
    assert info["devices"]["cpu"].startswith("CPU") and info["devices"]["auto"]
    assert info["cuda"] == torch.cuda.is_available()


def test_probe_of_something_that_is_not_python_fails_clearly(tmp_path, plugin_parent):
    with pytest.raises(WorkerError, match="cannot start"):
        probe_python(str(REPO / "README.md"), str(plugin_parent))
    with pytest.raises(WorkerError, match="cannot start"):
        probe_python(str(tmp_path / "nope" / "python"), str(plugin_parent))


def test_worker_job_with_options_out_of_range_is_an_input_error(tmp_path, pair, plugin_parent):
    """A non-numeric threshold (or any option out of range) comes back as kind 'input', without a traceback."""
    for bad, message in (({"threshold": "abc"}, "threshold must be a number between 0 and 1"),
                         ({"batch_size": 0}, "batch size must be between 1"),
                         ({"tile_size": 64, "overlap": 64}, "overlap must be less than the tile size")):
        proc = start_worker(plugin_parent, tmp_path)
        out, err = proc.communicate(json.dumps({**job(pair, tmp_path / "x.gpkg").to_dict(), **bad}) + "\n",
                                    timeout=60)
        assert proc.returncode == 2
        (event,) = [json.loads(line) for line in out.splitlines()]
        assert event["event"] == "error" and event["kind"] == "input" and message in event["message"], event
        assert "Traceback" not in err
        assert not (tmp_path / "x.gpkg").exists()


def test_probability_cache_key_and_pruning(tmp_path, pair):
    base = job(pair, tmp_path / "a.gpkg")
    key = cache_key(base)
    assert key == cache_key(base)
    # the key ignores threshold, minimum area, device, batch size and output, but not inputs, model, AOI or tiling
    same = {cache_key(base.__class__(**{**base.to_dict(), **change}))
            for change in ({"threshold": 0.7}, {"min_area": 50.0}, {"device": "auto"}, {"batch_size": 1},
                           {"output": str(tmp_path / "b.gpkg")}, {"captions": False})}
    assert same == {key}
    others = {cache_key(base.__class__(**{**base.to_dict(), **change}))
              for change in ({"before": str(pair.after), "after": str(pair.before)},
                             {"model": str(REPO / "resources" / "models" / "pix4cap-synthetic.json"), "tile_size": 64},
                             {"area_of_interest": {"wkt": "POINT(0 0)", "crs": "EPSG:4326"}},
                             {"tile_size": 128}, {"overlap": 8}, {"target_gsd": "model"})}
    assert key not in others and len(others) == 6
    cache = tmp_path / "cache"
    cache.mkdir()
    cache_path(cache, key).write_bytes(b"x")
    (cache / "probability-old.tif").write_bytes(b"x")
    assert prune_cache(cache, cache_path(cache, key)) == [cache / "probability-old.tif"]
    assert [p.name for p in cache.iterdir()] == [cache_path(cache, key).name]


def test_environment_plan_keeps_the_pinned_requirements(qgis_app, tmp_path):
    from changescribe.plugin.environment import (
        FALLBACK_REQUIREMENTS, plan_environment, requirement_lines, requirements_file, venv_python)

    assert requirement_lines(requirements_file()) == FALLBACK_REQUIREMENTS  # the fallback mirrors the pin
    plan = plan_environment("/usr/bin/python3", tmp_path / "env")
    venv_cmd, pip_cmd = plan.commands
    assert venv_cmd == ["/usr/bin/python3", "-m", "venv", "--system-site-packages", str(tmp_path / "env")]
    assert pip_cmd[:3] == [str(venv_python(tmp_path / "env")), "-m", "pip"]
    assert "-r" in pip_cmd and pip_cmd[pip_cmd.index("-r") + 1] == str(REPO / "requirements.txt")
    assert "-c" in pip_cmd and pip_cmd[pip_cmd.index("-c") + 1] == str(REPO / "constraints.txt")


def test_environment_task_creates_a_venv_and_says_what_it_did(qgis_app, tmp_path, plugin_parent):
    """Real ``python -m venv``; no pip install (that downloads GBs), so the new Python lacks torch and says so."""
    from changescribe.plugin.environment import CreateEnvironmentTask, plan_environment

    plan = plan_environment("/usr/bin/python3", tmp_path / "env", requirements=None)
    assert len(plan.commands) == 1
    task = CreateEnvironmentTask(plan, str(plugin_parent))
    lines: list[str] = []
    task.line.connect(lines.append)
    assert task.run()
    assert plan.python.is_file()
    assert not task.ok  # Debian's python3 has no torch
    assert str(tmp_path / "env") in task.report and "-m venv" in task.report
    assert "lacks torch" in task.report and f"{plan.python} -m pip install" in task.report
    assert lines[0].startswith("$ /usr/bin/python3 -m venv")
