"""The Annotate panel's suggestion in a separate Python: ``python -m changescribe.core.worker --suggest``."""

from __future__ import annotations

import json
import subprocess
import sys

import rasterio

from changescribe.core.model_loading import find_model
from changescribe.core.suggestion import SuggestionJob, suggest_caption
from changescribe.training.synthetic import write_pair


def _worker(line: str) -> tuple[int, list[dict]]:
    proc = subprocess.run([sys.executable, "-m", "changescribe.core.worker", "--suggest"], input=line,
                          capture_output=True, text=True, timeout=300)
    return proc.returncode, [json.loads(x) for x in proc.stdout.splitlines()]


def test_worker_suggests_the_same_caption_as_this_python(tmp_path):
    pair = write_pair(tmp_path, "s", size=256, seed=5, change_level=0.8)
    with rasterio.open(pair.before) as src:
        b = src.bounds
        crs = src.crs.to_wkt()
    job = SuggestionJob(str(pair.before), str(pair.after), str(find_model("default")), crs,
                        (b.left, b.bottom, (b.left + b.right) / 2, (b.bottom + b.top) / 2))
    rc, events = _worker(json.dumps(job.to_dict()) + "\n")
    assert rc == 0 and [e["event"] for e in events] == ["suggestion"], events
    assert events[0]["caption"] and events[0]["caption"] == suggest_caption(job)


def test_worker_refuses_a_bad_suggestion_job_in_one_line(tmp_path):
    rc, events = _worker("not json\n")
    assert rc == 2 and len(events) == 1 and events[0]["event"] == "error" and events[0]["kind"] == "input"
    rc, events = _worker(json.dumps({"before": "a.tif"}) + "\n")
    assert rc == 2 and events[0]["kind"] == "input" and "not a suggestion job" in events[0]["message"]
