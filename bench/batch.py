"""Scaling of ``changescribe batch`` on dask.distributed (issue 17.3).

Measures, on this machine:

1. the same set of whole-pair units on a LocalCluster of 1 worker (all cores to torch) and of 2 workers (half each):
   wall time, pairs/s and pixels/s;
2. the per-unit scheduler overhead: the wall time of a batch less the time its units ran inside the workers, per
   unit; and the round trip of an empty task through the same kind of cluster;
3. what a worker reads: the bytes of a pair's files over the seconds its unit ran (the read bandwidth one worker
   needs), from which the README projects N machines.

Every run is fresh (its output and work folder removed first). The pairs are copies of one pair (default: the
sample pair) under different names, so every unit does the same work.

    python bench/batch.py [--pair BEFORE AFTER] [--pairs 4] [--workers 1 2] [--model NAME] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _noop(i: int) -> int:
    return i


def task_round_trip(tasks: int = 200) -> float:
    """Seconds per empty task submitted to and gathered from a LocalCluster of one process."""
    from dask.distributed import Client, LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster, \
            Client(cluster) as client:
        client.gather(client.map(_noop, range(10)))  # warm
        t0 = time.perf_counter()
        client.gather(client.map(_noop, range(1000, 1000 + tasks)))
        return (time.perf_counter() - t0) / tasks


def halo_tiles(size: int, chunk: int, tile: int, overlap: int) -> tuple[int, int]:
    """(tiles of a whole size² run, tiles its chunk units run together): the chunks' halo tiles run twice. The same
    selection as :func:`changescribe.core.inference.predict_probability` (panels cut to the chunk, rows reaching it)."""
    from changescribe.core.inference import BLOCK, PANEL_WIDTH
    from changescribe.core.tiling import column_panels, tile_grid

    def count(x0: int, y0: int, x1: int, y1: int) -> int:
        panels = [p for p in (q.within(x0, x1) for q in column_panels(size, tile, overlap, PANEL_WIDTH, BLOCK)) if p]
        return sum(len(row) for p in panels for row in tile_grid(size, size, tile, overlap, p)
                   if row[0].row < y1 and row[0].row + row[0].height > y0)

    whole = count(0, 0, size, size)
    chunks = sum(count(c, r, min(c + chunk, size), min(r + chunk, size))
                 for r in range(0, size, chunk) for c in range(0, size, chunk))
    return whole, chunks


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pair", nargs=2, default=[str(REPO / "resources/sample/sample_before.tif"),
                                              str(REPO / "resources/sample/sample_after.tif")])
    p.add_argument("--pairs", type=int, default=4, help="units (copies of the pair) per run")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--model", default="default")
    p.add_argument("--captions", action="store_true", help="caption the regions too (default: masks only)")
    p.add_argument("--out", default=str(REPO / "build/bench/batch"))
    p.add_argument("--json", default=None, help="also write the figures here")
    args = p.parse_args(argv)

    import rasterio

    from changescribe.core.batch import run_batch, work_folder

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    before, after = (str(Path(x).resolve()) for x in args.pair)
    with rasterio.open(before) as ds:
        pixels = ds.width * ds.height
    pair_bytes = os.path.getsize(before) + os.path.getsize(after)
    manifest = out / "pairs.csv"
    manifest.write_text("name,before,after\n" + "".join(f"p{i},{before},{after}\n" for i in range(args.pairs)))
    options = {"model": args.model, "captions": args.captions}
    rows = []
    for workers in args.workers:
        gpkg = out / f"w{workers}.gpkg"
        gpkg.unlink(missing_ok=True)
        shutil.rmtree(work_folder(gpkg), ignore_errors=True)
        t0 = time.perf_counter()
        result = run_batch([str(manifest)], gpkg, options, workers=workers)
        wall = time.perf_counter() - t0
        assert not result.failed, result.failed
        unit_s = [u["seconds"] for u in result.units]
        per_worker: dict[str, float] = {}
        for u in result.units:
            per_worker[u["worker"]] = per_worker.get(u["worker"], 0.0) + u["seconds"]
        busiest = max(per_worker.values())
        rows.append({
            "workers": workers, "torch_threads": max(1, (os.cpu_count() or 1) // workers), "units": len(unit_s),
            "wall_s": round(wall, 1), "pairs_per_s": round(len(unit_s) / wall, 3),
            "mpx_per_s": round(len(unit_s) * pixels / wall / 1e6, 3),
            "unit_s_median": round(statistics.median(unit_s), 2),
            "unit_cpu_s_median": round(statistics.median(u["cpu_seconds"] for u in result.units), 2),
            "worker_mpx_per_s": round(statistics.median(pixels / s for s in unit_s) / 1e6, 3),
            "worker_read_mb_per_s": round(statistics.median(pair_bytes / s for s in unit_s) / 1e6, 2),
            # wall time not spent inside a unit by the busiest worker: cluster start, scheduling, assembly
            "overhead_s": round(wall - busiest, 1),
            "peak_rss_mb": max(u["peak_rss_mb"] or 0 for u in result.units),
            "model_loads_per_worker": max(u["model_loads"] or 0 for u in result.units),
        })
        print(json.dumps(rows[-1]), flush=True)
    for size in (16384,):
        whole, chunked = halo_tiles(size, 4096, 256, 32)
        print(json.dumps({"halo": {"pixels": f"{size}²", "chunk": 4096, "tile": 256, "overlap": 32, "whole_run_tiles": whole,
                                   "chunk_tiles": chunked, "extra": round(chunked / whole - 1, 4)}}), flush=True)
    trip = task_round_trip()
    report = {"pair": [before, after], "pixels": pixels, "pair_bytes": pair_bytes, "model": args.model,
              "captions": args.captions, "cores": os.cpu_count(), "runs": rows,
              "empty_task_round_trip_ms": round(trip * 1000, 2)}
    print(json.dumps({"empty_task_round_trip_ms": report["empty_task_round_trip_ms"]}))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    print("| workers | torch threads | units | wall s | pairs/s | Mpx/s | unit s (median) | overhead s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['workers']} | {r['torch_threads']} | {r['units']} | {r['wall_s']} | {r['pairs_per_s']} | "
              f"{r['mpx_per_s']} | {r['unit_s_median']} | {r['overhead_s']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
