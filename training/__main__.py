"""``python -m changescribe.training <recipe> --config FILE --out DIR``: train one recipe, export a model file.

Recipes: ``pix4cap`` (change mask + caption), ``bit-cd`` (BIT change detector), ``dfm`` (DFM: caption + TGCL
on a pre-trained bit-cd encoder), ``semantic-cc`` (Semantic-CC, three stages per epoch), ``sen-pretrain`` (SEN
stage 1: MoCo-v2 on unlabelled multi-date tiles -> a backbone file) and ``sen`` (SEN stage 2: captioning from it);
``pseudo-labels`` (a CD model labels LEVIR-CC for pix4cap); ``eval`` (the metric table of a model file);
``calibrate`` (a copy of a model file whose decision point 0.5 sits where the original's ``--threshold`` was).
``--ddp`` trains on all visible GPUs (or ``--nproc`` CPU processes) with DistributedDataParallel under torchrun.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

RECIPES = ("pix4cap", "bit-cd", "dfm", "semantic-cc", "sen-pretrain", "sen", "pseudo-labels", "eval", "calibrate")
# Earlier names of recipes, still accepted on the command line and in configs (and so in a card's recipe).
RECIPE_ALIASES = {"cd-bit": "bit-cd"}
TRAINERS = {"pix4cap": "pix4cap", "bit-cd": "bit_cd", "dfm": "dfm", "semantic-cc": "semantic_cc",
            "sen-pretrain": "sen_pretrain", "sen": "sen"}


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m changescribe.training", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("recipe", choices=RECIPES + tuple(RECIPE_ALIASES), help="a recipe to train, pseudo-labels, eval or calibrate")
    ap.add_argument("model", nargs="?", help="eval, calibrate: the model card (or model name)")
    ap.add_argument("--config", help="JSON recipe config (see training/configs/)")
    ap.add_argument("--out", help="run folder (checkpoints, log.csv, curves.png, the model file); "
                                  "pseudo-labels: the mask folder; calibrate: the folder of the calibrated copy")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    ap.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=JSON",
                    help='override a config value, e.g. --set optim.max_steps=2 --set data.train_pairs=16')
    ap.add_argument("--ddp", action="store_true",
                    help="DistributedDataParallel: relaunches under torchrun with one process per GPU "
                         "(gloo processes on the CPU); optim.batch_size is per process")
    ap.add_argument("--nproc", type=int, help="--ddp: number of processes (default: visible GPUs, CPU: 2)")
    ev = ap.add_argument_group("eval")
    ev.add_argument("--pairs", type=int, help="generated test scenes to score when no --data/--config (200)")
    ev.add_argument("--split", help="split of the --data folder or --config dataset (default test; none = the "
                                    "folder itself)")
    ev.add_argument("--beam-size", type=int, help="caption beam size (default 3, as the papers)")
    ev.add_argument("--record", nargs=2, metavar=("BLOCK", "LABEL"),
                    help='write the scores into the model card as metrics[BLOCK] labelled LABEL, e.g. '
                         '--record test_levircd "real crops (LEVIR-CD)"')
    ev.add_argument("--record-to", metavar="CARD",
                    help="--record into this model card instead of MODEL's (e.g. a leave-one-dataset-out fold's "
                         "held-out scores into the card of the model trained on all data)")
    pl = ap.add_argument_group("pseudo-labels")
    pl.add_argument("--cd-model", help="the change detector's model card (e.g. from the bit-cd recipe)")
    pl.add_argument("--data", help="eval: a dataset folder in the LEVIR-CD layout (A/, B/, label/) or the LEVIR-CC "
                                   "layout; pseudo-labels: the LEVIR-CC root (images/<split>/{A,B})")
    pl.add_argument("--captions", help="caption file (default DATA/LevirCCcaptions.json)")
    pl.add_argument("--splits", help="comma-separated splits (default: all in the caption file)")
    pl.add_argument("--batch-size", type=int, default=16, help="eval and pseudo-labels: pairs per batch")
    pl.add_argument("--threshold", type=float,
                    help="probability at which a pixel is change (default 0.5); calibrate: the original model's "
                         "threshold that becomes the copy's 0.5")
    pl.add_argument("--workers", type=int, default=0, help="DataLoader workers reading the images")
    pl.add_argument("--missing", choices=("error", "skip"), default="error",
                    help="skip caption-file pairs whose images are not on disk")
    return ap


# The options each command reads; any other option given is refused rather than silently ignored.
_COMMON = {"recipe", "device"}
_READS = {
    "eval": _COMMON | {"model", "config", "set", "data", "pairs", "split", "beam_size", "batch_size", "record",
                       "record_to", "threshold"},
    "calibrate": _COMMON | {"model", "threshold", "out"},
    "pseudo-labels": _COMMON | {"cd_model", "data", "out", "captions", "splits", "batch_size", "threshold",
                                "workers", "missing"},
}
_TRAIN_READS = _COMMON | {"config", "out", "resume", "set", "ddp", "nproc"}


def _refuse_ignored(ap: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """A command given an option it does not read stops with a message (an ignored option misleads)."""
    reads = _READS.get(args.recipe, _TRAIN_READS)
    defaults = {a.dest: a.default for a in ap._actions}
    given = [k for k, v in vars(args).items() if k not in reads and v != defaults.get(k)]
    if given:
        flags = ", ".join(("--" + k.replace("_", "-")) if k != "model" else "MODEL" for k in sorted(given))
        ap.error(f"{args.recipe} does not use {flags}")
    if args.recipe == "eval":
        if args.data and args.config:
            ap.error("eval scores either --data DIR or the --config dataset, not both")
        if args.pairs is not None and (args.data or args.config):
            ap.error("--pairs counts generated test scenes; it does not apply to --data/--config")
        if args.split is not None and not (args.data or args.config):
            ap.error("--split needs --data or --config")
        if args.record_to and not args.record:
            ap.error("--record-to needs --record BLOCK LABEL")


def _overrides(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, _, value = item.partition("=")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _relaunch_under_torchrun(argv: list[str], nproc: int | None, device: str) -> int:
    """``--ddp`` from a plain ``python -m``: start torchrun with the same arguments (it runs ``main`` again in
    every worker, where the torchrun environment is set)."""
    import torch
    from torch.distributed.run import main as torchrun

    if nproc is None:
        nproc = torch.cuda.device_count() if device != "cpu" and torch.cuda.is_available() else 2
    args = []
    skip = False
    for a in argv:  # --nproc belongs to this launcher only
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            args.append(a)
    try:
        torchrun(["--standalone", f"--nproc_per_node={nproc}", "-m", "changescribe.training", *args])
    except Exception as e:  # noqa: BLE001 - torchrun reports which worker failed and why
        print(f"error: DDP run failed: {e}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = _parser()
    args = ap.parse_args(argv)
    args.recipe = RECIPE_ALIASES.get(args.recipe, args.recipe)
    _refuse_ignored(ap, args)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    from changescribe.core.device import resolve_device

    from .config import load_config

    if args.recipe == "eval":
        from .evaluate import evaluate_model_file, print_table, record_metrics

        if not args.model:
            ap.error("eval needs a MODEL card")
        data = load_config(args.config, _overrides(args.set)).data if args.config else None
        device = str(resolve_device(args.device))
        split = "test" if args.split is None and args.config else args.split
        try:
            scores = evaluate_model_file(args.model, args.pairs or 200, beam_size=args.beam_size or 3, device=device,
                                         batch_size=args.batch_size, data=data, folder=args.data,
                                         split=None if split in ("", "none") else split,
                                         threshold=0.5 if args.threshold is None else args.threshold)
        except (ValueError, FileNotFoundError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print_table(scores)
        if args.record:
            card = record_metrics(args.record_to or args.model, args.record[0], scores, args.record[1])
            print(f"recorded as metrics[{args.record[0]!r}] in {card}")
        return 0
    if args.recipe == "calibrate":
        from .calibration import calibrate_model_file

        if not (args.model and args.out and args.threshold is not None):
            ap.error("calibrate needs MODEL, --threshold and --out")
        try:
            card = calibrate_model_file(args.model, args.threshold, args.out)
        except (ValueError, FileNotFoundError, FileExistsError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(f"model file: {card}")
        return 0
    if args.recipe == "pseudo-labels":
        from .pseudo_labels import write_pseudo_labels

        if not (args.cd_model and args.data and args.out):
            ap.error("pseudo-labels needs --cd-model, --data and --out")
        report = write_pseudo_labels(
            args.cd_model, args.data, args.out, captions=args.captions,
            splits=tuple(s for s in args.splits.split(",") if s) if args.splits else None,
            batch_size=args.batch_size, threshold=0.5 if args.threshold is None else args.threshold, device=str(resolve_device(args.device)),
            num_workers=args.workers, missing=args.missing)
        for split, counts in report.items():
            print(f"{split}: {counts['written']} masks written, {counts['skipped']} already there")
        return 0
    if not (args.config and args.out):
        ap.error("training needs --config and --out")

    from .engine import under_torchrun

    if args.ddp and not under_torchrun():
        return _relaunch_under_torchrun(argv, args.nproc, args.device)
    cfg = load_config(args.config, _overrides(args.set))
    if RECIPE_ALIASES.get(cfg.recipe, cfg.recipe) not in (args.recipe, args.recipe.replace("-", "_")):
        ap.error(f"{args.config} is a {cfg.recipe!r} config, not {args.recipe!r}")
    if cfg.data_cd is not None and args.recipe != "semantic-cc":
        ap.error(f"data_cd (a separate change-detection set) is read by semantic-cc only, not by {args.recipe}")
    device = str(resolve_device(args.device))
    import importlib

    recipe = importlib.import_module(f".recipes.{TRAINERS[args.recipe]}", __package__)
    card = recipe.train(cfg, args.out, device=device, resume=args.resume, ddp=args.ddp)
    if card is not None:
        print(f"{'backbone' if args.recipe == 'sen-pretrain' else 'model'} file: {card}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
