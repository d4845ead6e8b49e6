"""Progress that tells the truth: every stage reports in its own units and the time left covers all stages
(issue 14.2)."""

from __future__ import annotations

import sqlite3

from changescribe.core.pipeline import detect_changes
from changescribe.core.progress import RunProgress
from changescribe.core.run_control import RunControl
from changescribe.training.synthetic import write_pair


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_time_left_counts_the_stages_still_to_come():
    clock, seen = Clock(), []
    progress = RunProgress(RunControl(on_progress=lambda f, m: seen.append((f, m))), clock)
    progress.plan("tiles", 10, 1.0)
    progress.plan("strips", 5, 2.0)
    progress.plan("captions", 20, 0.5)
    tiles = progress.control("tiles")
    progress.begin("tiles")
    clock.t = 5.0
    tiles.progress(0.5, "tile 5/10")
    # 5 s spent, 5 tiles (1 s each, measured) + 5 strips × 2 s + 20 crops × 0.5 s still to come
    assert abs(seen[-1][0] - 5 / (5 + 5 + 10 + 10)) < 1e-9 and seen[-1][1] == "tile 5/10"
    clock.t = 10.0
    tiles.progress(1.0, "tile 10/10")
    assert abs(seen[-1][0] - 10 / (10 + 20)) < 1e-9  # the last tile is a third of the way, not 75 %
    strips = progress.control("strips")
    clock.t = 14.0
    strips.progress(0.4, "regions: strip 2/5")  # 2 s a strip, as guessed
    assert abs(seen[-1][0] - 14 / (14 + 6 + 10)) < 1e-9
    progress.plan("captions", 40, 0.5)  # more regions found than guessed: the estimate grows, the bar never goes back
    clock.t = 15.0
    strips.progress(0.6, "regions: strip 3/5")
    assert seen[-1][0] >= seen[-2][0]
    progress.done()
    assert seen[-1] == (1.0, "done")


def test_pipeline_reports_tiles_strips_and_captions_monotonically_to_one(tmp_path):
    pair = write_pair(tmp_path, "p", size=512, seed=2, change_level=0.8)
    seen: list[tuple[float, str]] = []
    result = detect_changes(pair.before, pair.after, output=tmp_path / "out.gpkg", device="cpu", batch_size=4,
                            control=RunControl(on_progress=lambda f, m: seen.append((f, m))))
    fractions = [f for f, _ in seen]
    assert all(b >= a for a, b in zip(fractions, fractions[1:])), fractions
    assert fractions[-1] == 1.0 and max(fractions[:-1]) < 1.0
    messages = [m for _, m in seen]
    first = {kind: next(i for i, m in enumerate(messages) if m.startswith(kind))
             for kind in ("tile ", "regions: strip ", "captions: ")}
    assert first["tile "] < first["regions: strip "] < first["captions: "], messages
    n = len(result.regions)
    assert n > 0 and f"captions: {n}/{n} regions" in messages
    # after the last tile there is still time left: the bar is not near its end yet
    last_tile = max(i for i, m in enumerate(messages) if m.startswith("tile "))
    assert fractions[last_tile] < 0.98
    con = sqlite3.connect(result.output)
    rows = con.execute("SELECT caption, caption_regions FROM change_regions").fetchall()
    con.close()
    assert len(rows) == n and all(c and k >= 1 for c, k in rows)
