"""``python -m changescribe.training <recipe> --config FILE --out DIR``: train one recipe, export a model file."""

from __future__ import annotations

import argparse
import json
import logging
import sys

RECIPES = ("pix4cap", "eval")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m changescribe.training", description=__doc__)
    ap.add_argument("recipe", choices=RECIPES, help="a recipe to train, or eval")
    ap.add_argument("model", nargs="?", help="eval: the model card (or model name) to evaluate")
    ap.add_argument("--config", help="JSON recipe config (see training/configs/)")
    ap.add_argument("--out", help="run folder: checkpoints, log.csv and the exported model file")
    ap.add_argument("--pairs", type=int, default=200, help="eval: held-out synthetic pairs")
    ap.add_argument("--beam-size", type=int, default=3, help="eval: caption beam size (papers: 3)")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    ap.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=JSON",
                    help='override a config value, e.g. --set optim.max_steps=2 --set data.train_pairs=16')
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    from changescribe.core.device import resolve_device

    from .config import load_config

    device = str(resolve_device(args.device))
    if args.recipe == "eval":
        from .evaluate import evaluate_model_file, print_table

        if not args.model:
            ap.error("eval needs a MODEL card")
        print_table(evaluate_model_file(args.model, args.pairs, beam_size=args.beam_size, device=device))
        return 0
    if not (args.config and args.out):
        ap.error("training needs --config and --out")

    overrides = {}
    for item in args.set:
        key, _, value = item.partition("=")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    cfg = load_config(args.config, overrides)
    if args.recipe == "pix4cap":
        from .recipes.pix4cap import train

        card = train(cfg, args.out, device=device, resume=args.resume)
    print(f"model file: {card}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
