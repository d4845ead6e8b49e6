"""``changescribe`` command line: the same pipeline the QGIS plugin runs, for scripts and GPU boxes."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from .errors import ChangeScribeError
from .version import VERSION


def _detect(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .pipeline import detect_changes
    from .run_control import RunControl

    bar = tqdm(total=1000, unit="‰", disable=args.quiet, file=sys.stderr, bar_format="{l_bar}{bar}| {elapsed}<{remaining}")

    def on_progress(frac: float, message: str) -> None:
        bar.n = int(frac * 1000)
        bar.set_description(message[:40], refresh=True)

    control = RunControl(on_progress=on_progress, on_log=(None if args.quiet else lambda m: tqdm.write(m, file=sys.stderr)))
    gsd = "model" if args.gsd == "model" else (float(args.gsd) if args.gsd else None)
    try:
        result = detect_changes(args.before, args.after, args.model, args.output, threshold=args.threshold,
                                min_area=args.min_area, tile_size=args.tile_size, overlap=args.overlap,
                                batch_size=args.batch_size, device=args.device, target_gsd=gsd,
                                probability_output=args.probability, captions=not args.no_captions,
                                beam_size=args.beam_size, control=control, detector=args.detector)
    finally:
        bar.close()
    if args.json:
        print(json.dumps({"output": str(result.output), "regions": len(result.regions),
                          "scene_caption": result.scene_caption, "summary": result.summary,
                          "probability": str(result.probability) if result.probability else None,
                          "tiles_per_second": result.stats.tiles_per_second}))
    else:
        print(f"GeoPackage: {result.output}")
        if result.probability:
            print(f"probability raster: {result.probability}")
        print(f"change regions: {len(result.regions)} ({result.summary})")
        print(f"scene caption: {result.scene_caption}")
    return 0


def _models(args: argparse.Namespace) -> int:
    from .model_card import card_summary
    from .model_loading import installed_models
    from .models.registry import list_models

    print("architectures:")
    for row in list_models():
        n = row["parameters"]
        count = f"{n / 1e6:8.2f} M params" if n is not None else "   (needs transformers/peft)"
        print(f"  {row['name']:<22} {row['paper']:<40} {count}")
    print("installed model files:")
    for card in installed_models():
        print(f"  {card['name']:<22} {card['architecture']:<16} v{card.get('version', '?'):<8} {card['path']}")
        print(f"    {card_summary(card)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="changescribe", description="Change detection and captioning for raster pairs.")
    p.add_argument("--version", action="version", version=f"changescribe {VERSION}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("detect", help="find, outline and caption changes between two rasters")
    d.add_argument("before", help="earlier raster (any GDAL format)")
    d.add_argument("after", help="later raster; put onto the before raster's grid")
    d.add_argument("-o", "--output", required=True, help="GeoPackage to write (.gpkg)")
    d.add_argument("--model", default="default", help="model name (see `changescribe models`) or model card path")
    d.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    d.add_argument("--threshold", type=float, default=0.5, help="change probability threshold (0..1)")
    d.add_argument("--min-area", type=float, default=0.0, help="drop regions smaller than this, in m²")
    d.add_argument("--tile-size", type=int, default=None, help="tile size in pixels (default: the model's)")
    d.add_argument("--overlap", type=int, default=None, help="tile overlap in pixels (default: tile/8)")
    d.add_argument("--batch-size", type=int, default=8)
    d.add_argument("--gsd", default=None, help="resample to this GSD in metres, or 'model' for the model's")
    d.add_argument("--probability", default=None, help="also write the probability raster (GeoTIFF) here")
    d.add_argument("--beam-size", type=int, default=None,
                   help="caption beam size (1 = greedy; default: the model's own, e.g. 3 for SEN, else 1)")
    d.add_argument("--detector", default=None, metavar="NAME_OR_PATH",
                   help="change detector (model name or card path) that makes the mask: replaces a captioner's "
                        "card pairing ('pair_with'), or the captioning model's own change head")
    d.add_argument("--no-captions", action="store_true", help="masks and polygons only")
    d.add_argument("--json", action="store_true", help="print the result as one JSON line")
    d.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    d.set_defaults(func=_detect)

    m = sub.add_parser("models", help="list model architectures and installed model files")
    m.set_defaults(func=_models)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if getattr(args, "output", None) and Path(args.output).suffix.lower() != ".gpkg":
        print(f"changescribe: error: output must be a .gpkg file: {args.output}", file=sys.stderr)
        return 2
    try:
        return args.func(args)
    except ChangeScribeError as exc:
        print(f"changescribe: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("changescribe: interrupted; nothing was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
