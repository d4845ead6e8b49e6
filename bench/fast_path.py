"""The CPU fast path (issue 17.4): the default model, with its shipped weights, on real 256² pairs, mask only and
mask + caption, on PyTorch and on ONNX Runtime, side by side with the published captioners' own inference code.

All cases run in one process on the same tiles (LEVIR-CC, LEVIR-CD and DSIFN crops from ``../shared/data``, 256² at
0.5 m) with the same torch / onnxruntime thread count, after one warm-up batch. Each case reports wall-clock pairs/s
and pairs per CPU-second (all threads): on a machine shared with other jobs, wall time measures the other jobs too,
while CPU time stays close to what the case costs. Mask + caption is one ``predict`` call: one encoder pass for both
(ONNX Runtime: the joint graph), then greedy or beam-search decoding with the KV cache in PyTorch.

    .venv/bin/python bench/fast_path.py --threads 2 --batch 8

The peers' figures are those of ``../shared/PEER_NUMBERS.md``: their own code, timed on this project's 2-core CPU
(2 threads, 256² pairs, 9 decode steps) on 2026-11-23; :data:`PEERS` copies them (not their code).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
DATA = REPO.parent / "shared" / "data"
# caption-only pairs/s (greedy, beam 3) of each published captioner's own inference code, ../shared/PEER_NUMBERS.md
PEERS = {"SEN": (4.76, 3.80), "Change-Agent (caption only)": (1.78, None), "RSICCformer": (1.52, 0.96),
         "Chg2Cap": (0.68, 0.45)}


def real_pairs(n: int):
    """Up to ``n`` real 256² before/after pairs (raw 0..255, (n, 3, 256, 256) each), repeated when fewer exist."""
    import torch
    from PIL import Image

    afters = sorted(p for d in ("levircc", "levircd_256", "dsifn_256") for p in (DATA / d / "B").glob("*.png"))
    if not afters:
        raise SystemExit(f"no real pairs under {DATA}")

    def load(path: Path) -> torch.Tensor:
        return torch.from_numpy(np.asarray(Image.open(path).convert("RGB"), dtype=np.float32).transpose(2, 0, 1).copy())

    pairs = [(load(p.parent.parent / "A" / p.name), load(p)) for p in afters]
    pairs = (pairs * (n // len(pairs) + 1))[:n]
    return torch.stack([b for b, _ in pairs]), torch.stack([a for _, a in pairs])


def timed(fn, reps: int) -> tuple[float, float, object]:
    """Median wall and CPU seconds of ``fn()`` over ``reps`` calls (after one warm-up), and its last result."""
    fn()
    walls, cpus, out = [], [], None
    for _ in range(reps):
        w, c = time.perf_counter(), time.process_time()
        out = fn()
        walls.append(time.perf_counter() - w)
        cpus.append(time.process_time() - c)
    return statistics.median(walls), statistics.median(cpus), out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--beams", type=int, nargs="+", default=[1, 3])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--runtimes", nargs="+", default=["pytorch", "onnxruntime"], choices=["pytorch", "onnxruntime"])
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)

    import torch

    from changescribe.core.model_loading import load_model

    torch.set_num_threads(args.threads)
    model = load_model(args.model, "cpu")
    before, after = real_pairs(args.batch)
    models = {"pytorch": model}
    if "onnxruntime" in args.runtimes:
        from changescribe.core.onnx_export import OnnxChangeModel, cpu_runtime

        fast = cpu_runtime(model, model.input_spec.tile_size, print, need=("cd", "joint"))
        if not isinstance(fast, OnnxChangeModel):
            raise SystemExit("onnxruntime is not usable here")
        models["onnxruntime"] = fast
    rows = []
    with torch.inference_mode():
        for runtime in args.runtimes:
            m = models[runtime]
            wall, cpu, _ = timed(lambda: m.change_probability(before, after), args.reps)
            mask = {"runtime": runtime, "case": "mask only", "wall_s": wall, "cpu_s": cpu}
            rows.append(mask)
            for beam in args.beams:
                wall, cpu, pred = timed(lambda: m.predict(before, after, with_captions=True, beam_size=beam), args.reps)
                words = sum(len(c.split()) for c in pred.captions) / len(pred.captions)
                rows.append({"runtime": runtime, "case": "mask + caption " + ("greedy" if beam == 1 else f"beam {beam}"),
                             "wall_s": wall, "cpu_s": cpu, "words": words,
                             "caption_share": cpu / mask["cpu_s"] - 1.0})
    n = args.batch
    print(f"\n{args.model} ({model.name}), {args.threads} threads, batch {n}, real 256² pairs, median of {args.reps}\n")
    print("| runtime | case | pairs/s (wall) | pairs per CPU-second | caption cost on top of the mask (CPU) | words/caption |")
    print("|---|---|---:|---:|---:|---:|")
    for r in rows:
        r["pairs_per_s"], r["pairs_per_cpu_s"] = n / r["wall_s"], n / r["cpu_s"]
        share = f"{100 * r['caption_share']:+.0f} %" if "caption_share" in r else ""
        words = f"{r['words']:.1f}" if "words" in r else ""
        print(f"| {r['runtime']} | {r['case']} | {r['pairs_per_s']:.1f} | {r['pairs_per_cpu_s']:.1f} | {share} | {words} |")
    best = max((r for r in rows if r["case"] == "mask + caption greedy"), key=lambda r: r["pairs_per_s"], default=None)
    if best is not None:
        print("\n| code | task | pairs/s greedy / beam 3 |\n|---|---|---|")
        beam3 = next((r for r in rows if r["runtime"] == best["runtime"] and r["case"] == "mask + caption beam 3"), None)
        print(f"| ChangeScribe {model.name} ({best['runtime']}), this run | mask + caption | {best['pairs_per_s']:.1f}"
              + (f" / {beam3['pairs_per_s']:.1f} |" if beam3 else " |"))
        for name, (greedy, b3) in PEERS.items():
            print(f"| {name}, own code (PEER_NUMBERS.md) | caption only | {greedy:.2f}"
                  + (f" / {b3:.2f} |" if b3 else " |"))
        fastest = max(PEERS.values())
        print(f"\nmask + caption against the fastest peer's caption only (wall): {best['pairs_per_s'] / fastest[0]:.1f}x "
              f"greedy" + (f", {beam3['pairs_per_s'] / fastest[1]:.1f}x beam 3" if beam3 else ""))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
