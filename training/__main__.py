"""``python -m changescribe.training <recipe> --config FILE --out DIR``: train one recipe, export a model file."""

from __future__ import annotations

import argparse
import json
import logging
import sys

RECIPES = ("pix4cap",)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m changescribe.training", description=__doc__)
    ap.add_argument("recipe", choices=RECIPES)
    ap.add_argument("--config", required=True, help="JSON recipe config (see training/configs/)")
    ap.add_argument("--out", required=True, help="run folder: checkpoints, log.csv and the exported model file")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    ap.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=JSON",
                    help='override a config value, e.g. --set optim.max_steps=2 --set data.train_pairs=16')
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    from changescribe.core.device import resolve_device

    from .config import load_config

    overrides = {}
    for item in args.set:
        key, _, value = item.partition("=")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    cfg = load_config(args.config, overrides)
    device = str(resolve_device(args.device))
    if args.recipe == "pix4cap":
        from .recipes.pix4cap import train

        card = train(cfg, args.out, device=device, resume=args.resume)
    print(f"model file: {card}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
