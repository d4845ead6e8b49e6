"""Pipeline throughput against the bare model, and peak memory, for growing rasters.

For each size a synthetic pair is written (cached under build/bench/), then, each in a fresh process so peak
RSS is per size: (a) the bare model on tiles already in memory, (b) the whole pipeline without captions
(align → tiles → blend → probability GeoTIFF → polygons → GeoPackage), (c) the same with captions.
The ratio (b)/(a) is the figure of merit: how much of the model's speed the streaming machinery keeps.

    .venv/bin/python bench/pipeline.py --sizes 1024 4096 10240 --device cpu
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CACHE = REPO / "build" / "bench"


MODEL = "default"  # --model
ONNXRUNTIME = True  # --no-onnxruntime: PyTorch only, in the bare model and the pipeline alike
PAIR: tuple[str, str] | None = None  # --pair: a real before/after pair instead of the synthetic ones


def ensure_pair(size: int):
    from changescribe.training.synthetic import write_pair

    if PAIR is not None:
        return Path(PAIR[0]), Path(PAIR[1])
    folder = CACHE / f"pair_{size}"
    if not (folder / "p_after.tif").exists():
        write_pair(folder, "p", size=size, seed=size, change_level=0.5, progress=True)
    return folder / "p_before.tif", folder / "p_after.tif"


def bare_model(size: int, device: str, batch: int, tiles: int, repeats: int = 4) -> dict:
    import numpy as np
    import torch
    from rasterio.windows import Window

    from changescribe.core.model_loading import load_model
    from changescribe.core.raster_pair import AlignedPair

    before, after = ensure_pair(size)
    model = runtime(load_model(MODEL, device), captions=False)
    t = model.input_spec.tile_size
    with AlignedPair(before, after) as pair:
        n_side = max(1, min(pair.width // t, int(np.ceil(np.sqrt(tiles)))))
        wins = [Window(c * t, r * t, t, t) for r in range(n_side) for c in range(n_side)][:tiles]
        data = [pair.read(w) for w in wins]
    b = torch.from_numpy(np.stack([d[0] for d in data])).to(device)
    a = torch.from_numpy(np.stack([d[1] for d in data])).to(device)
    with torch.inference_mode():
        for _ in range(3):  # warm-up: the first CPU batches pay for thread-pool start and allocator growth
            model.change_probability(b[:batch], a[:batch])
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0, c0 = time.perf_counter(), _cpu_seconds()
        for _ in range(repeats):
            for i in range(0, len(b), batch):
                model.change_probability(b[i:i + batch], a[i:i + batch])
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        cpu = _cpu_seconds() - c0
    return {"tiles": len(b) * repeats, "tiles_per_s": len(b) * repeats / dt, "cpu_seconds": cpu,
            "tiles_per_cpu_s": len(b) * repeats / cpu, "runtime": model.describe().get("runtime", "pytorch")}


def runtime(model, captions: bool):
    """The model as the pipeline runs it: on the CPU with onnxruntime installed, on ONNX Runtime (its graphs
    exported or read from the cache now: a one-off cost, like loading the model)."""
    if not ONNXRUNTIME or model.device.type != "cpu":
        return model
    from changescribe.core.onnx_export import cpu_runtime

    return cpu_runtime(model, model.input_spec.tile_size, print,
                       need=("cd", "caption_encoder") if captions and model.can_caption else ("cd",))


def pipeline(size: int, device: str, batch: int, captions: bool) -> dict:
    import torch

    from changescribe.core.model_loading import load_model
    from changescribe.core.pipeline import detect_changes

    before, after = ensure_pair(size)
    out = CACHE / f"out_{size}_{int(captions)}.gpkg"
    # Loading and warming up the model is a one-off cost, not per tile: the bare-model timing excludes it too.
    model = load_model(MODEL, device)
    warm = runtime(model, captions)  # the pipeline finds the same sessions (core.onnx_export keeps them)
    t = model.input_spec.tile_size
    with torch.inference_mode():
        zeros = torch.zeros(batch, 3, t, t, device=device)
        warm.change_probability(zeros, zeros)
        if captions and warm.can_caption:
            warm.caption(zeros[:2], zeros[:2])
    from changescribe.core.run_control import RunControl

    stage_cpu: dict[str, float] = {}  # CPU seconds at which each stage first reported

    def track(_fraction: float, message: str) -> None:
        kind = message.split(" ")[0].rstrip(":")
        if kind and kind not in stage_cpu:
            stage_cpu[kind] = _cpu_seconds()

    t0, c0 = time.perf_counter(), _cpu_seconds()
    result = detect_changes(before, after, model, out, batch_size=batch, device=device, captions=captions,
                            min_area=10.0, control=RunControl(on_progress=track), overwrite=True,
                            onnxruntime=ONNXRUNTIME)
    dt = time.perf_counter() - t0
    end = _cpu_seconds()
    return {"tiles": result.stats.tiles, "tiles_per_s": result.stats.tiles / dt,
            "inference_tiles_per_s": result.stats.tiles_per_second, "regions": len(result.regions),
            "seconds": dt, "cpu_seconds": end - c0,
            # CPU seconds of the caption stage: from its first report to the end of the run (scene caption, write)
            "captions_cpu_seconds": end - stage_cpu["captions"] if "captions" in stage_cpu else 0.0}


def _cpu_seconds() -> float:
    """CPU time of this process, all threads: unlike wall time, it does not grow when other jobs share the CPU."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def child(args: argparse.Namespace) -> None:
    fn = {"bare": lambda: bare_model(args.size, args.device, args.batch_size, args.tiles),
          "pipeline": lambda: pipeline(args.size, args.device, args.batch_size, False),
          "captions": lambda: pipeline(args.size, args.device, args.batch_size, True)}[args.child]
    res = fn()
    res["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(res))


def run_child(kind: str, size: int, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, "--size", str(size), "--device", args.device,
           "--batch-size", str(args.batch_size), "--tiles", str(args.tiles), "--model", args.model] + \
        (["--pair", *PAIR] if PAIR else []) + ([] if args.onnxruntime else ["--no-onnxruntime"])
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1024, 4096, 10240])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--tiles", type=int, default=64, help="tiles for the bare-model measurement")
    ap.add_argument("--captions", action="store_true", help="also time the run with captions")
    ap.add_argument("--skip-bare", action="store_true", help="do not time the bare model")
    ap.add_argument("--captions-only", action="store_true",
                    help="one run with captions; the run without is its CPU time less the caption stage's (for a "
                         "machine so busy that every run counts)")
    ap.add_argument("--repeat", type=int, default=1,
                    help="run without and with captions this many times, alternating, and keep each one's fastest "
                         "(a machine shared with other jobs varies a lot between runs)")
    ap.add_argument("--pair", nargs=2, metavar=("BEFORE", "AFTER"),
                    help="time this real pair (once, its own size) instead of the synthetic sizes")
    ap.add_argument("--model", default="default", help="model name or card (default: the shipped default)")
    ap.add_argument("--no-onnxruntime", dest="onnxruntime", action="store_false",
                    help="PyTorch only (by default, on the CPU with onnxruntime installed, the bare model and the "
                         "pipeline both run the encoder and mask head on ONNX Runtime, as a run does)")
    ap.add_argument("--child", choices=["bare", "pipeline", "captions"], help=argparse.SUPPRESS)
    ap.add_argument("--size", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    global PAIR, MODEL, ONNXRUNTIME
    PAIR = tuple(args.pair) if args.pair else None
    MODEL = args.model
    ONNXRUNTIME = args.onnxruntime
    if PAIR is not None and not args.child:
        import rasterio

        with rasterio.open(PAIR[0]) as src:
            args.sizes = [src.width]
    if args.child:
        child(args)
        return
    rows = []
    for size in args.sizes:
        ensure_pair(size)
        bare = {"tiles_per_s": float("nan"), "peak_rss_mb": float("nan")} if args.skip_bare else \
            run_child("bare", size, args)
        if args.captions_only:
            cap = run_child("captions", size, args)
            rest = cap["cpu_seconds"] - cap["captions_cpu_seconds"]
            print(json.dumps(cap), file=sys.stderr)
            print(f"| {size}² | {cap['regions']} regions | run with captions {cap['seconds']:.1f} s wall, "
                  f"{cap['cpu_seconds']:.1f} s CPU, of which captions {cap['captions_cpu_seconds']:.1f} s CPU | "
                  f"with / without captions (CPU): {cap['cpu_seconds'] / rest:.2f} |")
            if not args.skip_bare:  # the target: a whole run with captions keeps >= 80 % of the bare model's speed
                print(f"| bare model ({bare['runtime']}) {bare['tiles_per_s']:.1f} tiles/s wall, "
                      f"{bare['tiles_per_cpu_s']:.1f} per CPU-second | run with captions {cap['tiles_per_s']:.1f} tiles/s "
                      f"wall, {cap['tiles'] / cap['cpu_seconds']:.1f} per CPU-second | run with captions / bare model: "
                      f"{cap['tiles_per_s'] / bare['tiles_per_s']:.2f} wall, "
                      f"{cap['tiles'] / cap['cpu_seconds'] / bare['tiles_per_cpu_s']:.2f} CPU |")
            continue
        pipes, caps = [], []
        for _ in range(max(1, args.repeat)):
            pipes.append(run_child("pipeline", size, args))
            if args.captions:
                caps.append(run_child("captions", size, args))
        pipe = min(pipes, key=lambda p: p["seconds"])
        row = {"size": size, "mpx_per_s": size * size / pipe["seconds"] / 1e6, "tiles": pipe["tiles"], "bare": bare["tiles_per_s"], "pipeline": pipe["tiles_per_s"],
               "inference": pipe["inference_tiles_per_s"],
               "ratio": pipe["tiles_per_s"] / bare["tiles_per_s"], "rss_bare": bare["peak_rss_mb"],
               "rss_pipeline": pipe["peak_rss_mb"], "seconds": pipe["seconds"], "regions": pipe["regions"]}
        if args.captions:
            cap = min(caps, key=lambda p: p["seconds"])
            row.update(captions=cap["tiles_per_s"], rss_captions=cap["peak_rss_mb"], seconds_captions=cap["seconds"],
                       cpu=pipe["cpu_seconds"], cpu_captions=cap["cpu_seconds"], regions_captions=cap["regions"])
        rows.append(row)
        print(json.dumps(row), file=sys.stderr)
    print(f"\nmodel {args.model}, device {args.device}, batch {args.batch_size}")
    head = ("| pixels | tiles | bare model tiles/s | pipeline tiles/s (inference stage) | ratio | peak RSS pipeline "
            "| run time | pipeline Mpx/s | regions |")
    print(head + ("" if not args.captions else " run time with captions | with / without (wall; CPU time) "
                                                "| peak RSS captions |"))
    print("|" + "---|" * (head.count("|") - 1 + (2 if args.captions else 0)))
    for r in rows:
        line = (f"| {r['size']}² | {r['tiles']} | {r['bare']:.1f} | {r['pipeline']:.1f} ({r['inference']:.1f}) | "
                f"{r['ratio']:.2f} | "
                f"{r['rss_pipeline']:.0f} MB | {r['seconds']:.1f} s | {r['mpx_per_s']:.2f} | {r['regions']} |")
        if args.captions:
            line += (f" {r['seconds_captions']:.1f} s | {r['seconds_captions'] / r['seconds']:.2f}; "
                     f"{r['cpu_captions'] / r['cpu']:.2f} | "
                     f"{r['rss_captions']:.0f} MB |")
        print(line)


if __name__ == "__main__":
    main()
