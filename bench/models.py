"""Throughput (image pairs per second) and peak memory of every registered model, per configuration,
batch size and decoding mode.

Each case runs in a fresh process (so peak RSS is per case on CPU; on CUDA the peak is
``torch.cuda.max_memory_allocated``). A case = one ``predict`` per batch: encoder, change mask (when the
model has a change head) and captions (greedy or beam search), on random 0..255 tiles of the model's
tile size, after one warm-up batch. Weights are random (built from the config; no download), so caption
lengths are those of an untrained model: almost always the full ``--max-length`` - a worst case. The
mean generated length is reported with each row.

    .venv/bin/python bench/models.py --models sen-small dfm-small semantic-cc-small --batch-sizes 1 8 --threads 1
    .venv/bin/python bench/models.py --device cuda --bf16 --channels-last --compile --batch-sizes 1 64

GPU flags: ``--bf16`` (bf16 autocast around encoder, mask and decoding; the weights stay float32),
``--channels-last`` (memory format of the weights and of the input tiles), ``--compile`` (``torch.compile`` of the
encoder). Semantic-CC's paper configs hold a 7B LLM (about 29 GB of float32 weights): they need a GPU and are
skipped on CPU unless ``--allow-huge``.
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
LEVIRCC = REPO.parent / "shared" / "data" / "levircc_captions.json"
SMALL = ("sen-small", "dfm-small", "semantic-cc-small", "pix4cap-tiny")
PAPER = ("sen", "dfm", "semantic-cc-vit-b", "semantic-cc-vit-l", "pix4cap", "bit-cd")
HUGE = ("semantic-cc-vit-b", "semantic-cc-vit-l")
# Imported published checkpoints (``changescribe models import``): the architecture and config their import gives,
# read from the peer's (key, shape) manifest, so the timing is of exactly what an imported model runs.
PUBLISHED = {"bit:levir-cd": REPO / "tests" / "data" / "published" / "bit_base_transformer_pos_s4_dd8_dedim8.json",
             "rsiccformer:levir-cc": REPO / "tests" / "data" / "published"
             / "rsiccformer_resnet101_MCCFormers_diff_as_Q_trans.json",
             "change-agent-mci:levir-mci": REPO / "tests" / "data" / "published"
             / "change_agent_mci_segformer-mit_b1.json"}


def published_architecture(name: str):
    """(architecture, config) of an imported published checkpoint, from its manifest (no weights needed)."""
    import torch

    from changescribe.core.models.converters import CONFIGS
    from changescribe.core.published import get_family

    manifest = json.loads(PUBLISHED[name].read_text())
    state = {k: torch.empty(shape, device="meta") for k, shape, _ in manifest["keys"]}
    family = manifest["family"]
    return get_family(family).architecture, CONFIGS[family](state, str(PUBLISHED[name]))


def _vocabulary(size: int):
    from changescribe.core.vocabulary import Vocabulary

    if LEVIRCC.is_file():
        v = Vocabulary.from_levircc(LEVIRCC)
        if len(v) == size:
            return v
    return Vocabulary([f"w{i}" for i in range(size - 4)])


def run_case(args: argparse.Namespace) -> dict:
    import torch

    from changescribe.core.model_api import InputSpec
    from changescribe.core.models.adapter import TorchChangeModel
    from changescribe.core.models.registry import build_model, get_entry

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dev = torch.device(args.device)
    label = args.model
    if label in PUBLISHED:  # an imported checkpoint: its architecture and config, timed under its own name
        args.model, published_cfg = published_architecture(label)
    cfg = published_cfg if label in PUBLISHED else get_entry(args.model).config
    vocab = _vocabulary(cfg.vocab_size) if get_entry(args.model).captions else None  # every captioner's config has one
    t_build = time.perf_counter()
    with torch.device(dev):
        module, cfg = build_model(args.model, cfg, vocabulary=vocab)
    args.model = label
    t_build = time.perf_counter() - t_build
    if args.channels_last:
        module = module.to(memory_format=torch.channels_last)
    if args.compile:
        module.encode = torch.compile(module.encode)
    model = TorchChangeModel(module, InputSpec(tile_size=args.tile), vocab, name=args.model)
    params = sum(p.numel() for p in module.parameters())
    g = torch.Generator().manual_seed(1)
    before = (torch.rand(args.batch, 3, args.tile, args.tile, generator=g) * 255).to(dev)
    after = (torch.rand(args.batch, 3, args.tile, args.tile, generator=g) * 255).to(dev)
    if args.channels_last:  # normalisation keeps the layout, so the first convolution already sees NHWC
        before = before.contiguous(memory_format=torch.channels_last)
        after = after.contiguous(memory_format=torch.channels_last)
    captions = model.can_caption

    def once() -> list[str] | None:
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=args.bf16):
            if model.can_detect:
                pred = model.predict(before, after, with_captions=captions, beam_size=args.beam)
                return pred.captions
            return model.caption(before, after, beam_size=args.beam, max_length=args.max_length)

    if model.can_caption and vocab is not None:
        vocab.max_length = args.max_length
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    once()  # warm-up (and compilation)
    sync()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    reps, t0, caps = 0, time.perf_counter(), None
    while reps < args.min_reps or (time.perf_counter() - t0 < args.min_seconds and reps < 50):
        caps = once()
        reps += 1
    sync()
    dt = (time.perf_counter() - t0) / reps
    peak = (torch.cuda.max_memory_allocated() / 2**20 if dev.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    words = sum(len(c.split()) for c in caps) / len(caps) if caps else 0.0
    return {"model": args.model, "params_m": params / 1e6, "batch": args.batch, "beam": args.beam,
            "device": args.device, "bf16": args.bf16, "channels_last": args.channels_last, "compile": args.compile,
            "pairs_per_s": args.batch / dt, "s_per_batch": dt,
            "peak_mib": peak, "caption_words": words, "detects": model.can_detect, "captions": captions,
            "build_s": t_build, "threads": torch.get_num_threads()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(SMALL + PAPER + tuple(PUBLISHED)))
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 64])
    p.add_argument("--beams", nargs="+", type=int, default=[1, 3], help="1 = greedy")
    p.add_argument("--device", default="cpu")
    p.add_argument("--tile", type=int, default=256)
    p.add_argument("--max-length", type=int, default=40, help="caption length limit incl. <START>/<END>")
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads (0 = torch's default). On a CPU shared with other work, 1 thread is "
                        "often several times faster for caption decoding (no OpenMP barrier waits)")
    p.add_argument("--min-reps", type=int, default=1)
    p.add_argument("--min-seconds", type=float, default=3.0)
    p.add_argument("--timeout", type=int, default=900, help="seconds per case")
    p.add_argument("--allow-huge", action="store_true", help="run 7B-LLM configs on CPU too")
    p.add_argument("--json", type=Path, default=None, help="also write the rows here")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    p.add_argument("--beam", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(run_case(args)))
        return 0
    rows = []
    flags = [f for f, on in (("--bf16", args.bf16), ("--channels-last", args.channels_last),
                             ("--compile", args.compile)) if on]
    print("| model | params (M) | batch | decoding | pairs/s | s/batch | peak memory (MiB) | words/caption |")
    print("|---|---:|---:|---|---:|---:|---:|---:|")
    for name in args.models:
        if name in HUGE and args.device == "cpu" and not args.allow_huge:
            print(f"| {name} | | | skipped on CPU (7B LLM) | | | | |", flush=True)
            continue
        for batch in args.batch_sizes:
            for beam in args.beams:
                cmd = [sys.executable, __file__, "--worker", "--model", name, "--batch", str(batch),
                       "--beam", str(beam), "--device", args.device, "--tile", str(args.tile), "--max-length", str(args.max_length),
                       "--min-reps", str(args.min_reps), "--min-seconds", str(args.min_seconds),
                       "--threads", str(args.threads), *flags]
                try:
                    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, cwd=REPO)
                except subprocess.TimeoutExpired:
                    print(f"| {name} | | {batch} | {'greedy' if beam == 1 else f'beam {beam}'} | timeout | | | |",
                          flush=True)
                    continue
                if proc.returncode:
                    tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
                    print(f"| {name} | | {batch} | beam {beam} | failed: {tail} | | | |", flush=True)
                    continue
                r = json.loads(proc.stdout.strip().splitlines()[-1])
                rows.append(r)
                dec = "greedy" if beam == 1 else f"beam {beam}"
                if not r["captions"]:
                    dec = "mask only"
                print(f"| {name} | {r['params_m']:.1f} | {batch} | {dec} | {r['pairs_per_s']:.2f} | "
                      f"{r['s_per_batch']:.2f} | {r['peak_mib']:.0f} | {r['caption_words']:.1f} |", flush=True)
                if not r["captions"]:
                    break  # decoding mode does not matter for a mask-only model
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
