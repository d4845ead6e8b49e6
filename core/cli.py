"""``changescribe`` command line: the same pipeline the QGIS plugin runs, for scripts and GPU boxes."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys

from .api import FIELDS, MAX_TILE_SIZE, MIN_TILE_SIZE, DetectRequest
from .errors import ChangeScribeError
from .version import VERSION


# Every DetectRequest field and the `changescribe detect` argument that sets it; the argument's dest is the field's
# name, so detect_request() copies nothing by hand (tests/test_api.py checks that no field is missing).
REQUEST_ARGUMENTS = {
    "before": "before", "after": "after", "output": "--output", "model": "--model", "detector": "--detector",
    "device": "--device", "threshold": "--threshold", "min_area": "--min-area", "tile_size": "--tile-size",
    "overlap": "--overlap", "batch_size": "--batch-size", "target_gsd": "--gsd", "area_of_interest": "--area",
    "captions": "--no-captions", "beam_size": "--beam-size", "probability_output": "--probability",
    "reuse_probability": "--reuse-probability", "cache_dir": "--cache", "overwrite": "--overwrite",
    "fill_nodata": "--keep-border-fill", "onnxruntime": "--no-onnxruntime",
}


def detect_request(args: argparse.Namespace) -> DetectRequest:
    """The run the ``detect`` arguments ask for; an option out of range raises :class:`InputError`."""
    values = {name: getattr(args, name) for name in FIELDS}
    if args.area_of_interest is not None:
        values["area_of_interest"] = {"wkt": args.area_of_interest, "crs": args.area_crs or ""}
    return DetectRequest(**values)


def _detect(args: argparse.Namespace) -> int:
    request = detect_request(args)  # before anything heavy is imported: a bad option fails at once
    from tqdm import tqdm

    from .run import run_request
    from .run_control import RunControl

    bar = tqdm(total=1000, unit="‰", disable=args.quiet, file=sys.stderr, bar_format="{l_bar}{bar}| {elapsed}<{remaining}")

    def on_progress(frac: float, message: str) -> None:
        bar.n = int(frac * 1000)
        bar.set_description(message[:40], refresh=True)

    control = RunControl(on_progress=on_progress, on_log=(None if args.quiet else lambda m: tqdm.write(m, file=sys.stderr)))
    try:
        result = run_request(request, control).summary_result()
    finally:
        bar.close()
    if args.json:
        print(json.dumps(result.to_dict()))
    else:
        print(f"GeoPackage: {result.output}")
        if result.probability:
            print(f"probability raster: {result.probability}")
        print(f"change regions: {result.regions} ({result.summary}); flagged captions: {result.flagged}")
        print(f"scene caption: {result.scene_caption}")
    return 0


# DetectRequest fields a batch sets per unit (from its manifest and work folder), never from the options.
PER_UNIT_FIELDS = ("before", "after", "output", "area_of_interest", "probability_output", "reuse_probability",
                   "cache_dir")


def run_options(args: argparse.Namespace) -> dict:
    """The shared run options (:func:`add_run_options`) as DetectRequest fields, for every unit of a batch."""
    return {name: getattr(args, name) for name in FIELDS if name in vars(args) and name not in PER_UNIT_FIELDS}


def _batch(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    if not args.verbose:  # dask's own log lines (workers starting, closing) are not the user's business
        for name in ("distributed", "tornado", "asyncio"):
            logging.getLogger(name).setLevel(logging.CRITICAL)

    from .batch import DEFAULT_CHUNK_SIZE, DEFAULT_RETRIES, run_batch

    bar = None

    def on_unit(row: dict, done: int, total: int) -> None:
        nonlocal bar
        if args.json:
            print(json.dumps({"event": "unit", "done": done, "total": total, **row}), flush=True)
        if bar is None:
            bar = tqdm(total=total, initial=done - 1, unit="unit", disable=args.quiet or args.json, file=sys.stderr)
        bar.update(1)
        if row["status"] != "done":
            tqdm.write(f"unit {row['unit']} failed: {row['error']}", file=sys.stderr)

    def on_log(text: str) -> None:
        if args.json:
            print(json.dumps({"event": "log", "message": text}), flush=True)
        elif not args.quiet:
            tqdm.write(text, file=sys.stderr)

    try:
        result = run_batch(args.manifest, args.output, run_options(args), areas=args.areas, workers=args.workers,
                           scheduler=args.scheduler, chunk_size=args.chunk_size or DEFAULT_CHUNK_SIZE,
                           retries=DEFAULT_RETRIES if args.retries is None else args.retries,
                           overwrite=args.overwrite, on_unit=on_unit, on_log=on_log)
    finally:
        if bar is not None:
            bar.close()
    if args.json:
        print(json.dumps({"event": "result", "output": str(result.output) if result.output else None,
                          "regions": result.regions, "summary": result.summary(), "failed": len(result.failed),
                          "seconds": result.seconds}), flush=True)
    else:
        print(f"GeoPackage: {result.output if result.output else '(none: no pair finished)'}")
        print(result.summary())
    if result.failed:
        first = result.failed[0]
        print(f"changescribe: error: {len(result.failed)} of {len(result.units)} units failed (first: {first['unit']}: "
              f"{first['error']}); run the same command again to retry them", file=sys.stderr)
        return 2
    return 0


def _import(args: argparse.Namespace) -> int:
    from .published import default_folder, import_checkpoint

    folder = args.folder or default_folder() or "."
    card = import_checkpoint(args.checkpoint, args.family, folder, name=args.name, dataset=args.dataset,
                             word_map=args.word_map)
    print(f"model file: {card} (+ {card.with_suffix('.safetensors').name})")
    print(f"use it with: changescribe detect BEFORE AFTER -o OUT.gpkg --model {card}")
    return 0


def _models(args: argparse.Namespace) -> int:
    if getattr(args, "models_command", None) == "import":
        return _import(args)
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


def _clean(args: argparse.Namespace) -> int:
    from .atomic import remove_stale_temporaries

    removed = remove_stale_temporaries(*args.folders)
    for path in removed:
        print(f"removed {path}")
    print(f"{len(removed)} temporary file(s) of crashed runs removed")
    return 0


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler, ``timeout``, a shutdown): unwinds like Ctrl-C, so every temporary is removed."""


def _terminate(signum, frame) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not interrupt the clean-up
    raise Terminated()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="changescribe", description="Change detection and captioning for raster pairs.")
    p.add_argument("--version", action="version", version=f"changescribe {VERSION}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("detect", help="find, outline and caption changes between two rasters")
    d.add_argument("before", help="earlier raster (any GDAL format)")
    d.add_argument("after", help="later raster; put onto the before raster's grid")
    d.add_argument("-o", "--output", required=True, help="GeoPackage to write (.gpkg)")
    add_run_options(d)
    d.add_argument("--area", dest="area_of_interest", default=None, metavar="WKT",
                   help="limit the run to this polygon (WKT, in the CRS given by --area-crs)")
    d.add_argument("--area-crs", dest="area_crs", default=None, metavar="CRS", help="the CRS of --area, e.g. EPSG:32633")
    d.add_argument("--probability", dest="probability_output", default=None,
                   help="also write the probability raster (GeoTIFF) here")
    d.add_argument("--reuse-probability", dest="reuse_probability", default=None, metavar="PROB.tif",
                   help="skip inference: use this probability raster of an earlier run on the same inputs and grid")
    d.add_argument("--cache", dest="cache_dir", default=None, metavar="DIR",
                   help="keep the probability map in DIR and re-use it when inputs, model, area and tiling are the "
                        "same (a new threshold or minimum area then runs no inference)")
    d.add_argument("--json", action="store_true", help="print the result as one JSON line")
    d.set_defaults(func=_detect)

    b = sub.add_parser("batch", help="many pairs, or one huge pair in chunks, on dask.distributed (one GeoPackage)")
    b.add_argument("manifest", nargs="+", metavar="MANIFEST",
                   help="a CSV or GeoPackage with before and after columns (optional name, area), or two mosaics "
                        "(before after, e.g. VRTs)")
    b.add_argument("-o", "--output", required=True, help="GeoPackage to write (.gpkg); finished units are kept in "
                                                         "OUTPUT-stem.units/ so a re-run resumes")
    b.add_argument("--areas", default=None, metavar="LAYER",
                   help="with two mosaics: a polygon layer, one pair per polygon (default: the whole overlap)")
    b.add_argument("--workers", type=int, default=None,
                   help="LocalCluster worker processes (default: one per core; torch threads = cores / workers)")
    b.add_argument("--scheduler", default=None, metavar="ADDRESS",
                   help="use this dask scheduler (tcp://host:8786) instead of a LocalCluster; every worker must "
                        "see the same paths")
    b.add_argument("--chunk-size", dest="chunk_size", type=int, default=None,
                   help="a pair larger than this many pixels a side runs in chunks of this size (multiple of 256; "
                        "default 4096)")
    b.add_argument("--retries", type=int, default=None, help="retries of a unit whose worker failed (default 2)")
    b.add_argument("--json", action="store_true", help="one JSON line per finished unit, then the result")
    add_run_options(b)
    b.set_defaults(func=_batch)
    m = sub.add_parser("models", help="list model architectures and installed model files; import published ones")
    m.set_defaults(func=_models)
    msub = m.add_subparsers(dest="models_command")
    from .published import FAMILIES

    i = msub.add_parser("import", help="turn a published checkpoint (e.g. BIT's best_ckpt.pt) into a ChangeScribe "
                                       "model file; read with torch.load(weights_only=True), or (RSICC's pickled "
                                       "modules) an unpickler that runs no code from the file")
    i.add_argument("checkpoint", help="the checkpoint file as its authors publish it")
    i.add_argument("--from", dest="family", required=True, choices=sorted(FAMILIES),
                   help="the code base it comes from: " + "; ".join(f"{f.name} = {f.title}" for f in FAMILIES.values()))
    i.add_argument("--name", default=None, help="model name (default: FAMILY-DATASET, e.g. bit-levir-cd)")
    i.add_argument("--dataset", default=None,
                   help="the dataset the checkpoint was trained on (sets GSD and reported metrics; default: the "
                        "family's first: " + ", ".join(f"{f.name}: {'/'.join(f.datasets)}" for f in FAMILIES.values())
                        + ")")
    i.add_argument("--word-map", default=None,
                   help="a captioner's word map (rsiccformer: WORDMAP_*.json; change-agent-mci: LEVIR_MCI/"
                        "vocab.json; default: the one beside the checkpoint or in its ../data folder)")
    i.add_argument("--folder", default=None, help="where to write NAME.json + NAME.safetensors (default: the first "
                                                  "folder of $CHANGESCRIBE_MODEL_PATH, else the current folder); an "
                                                  "existing model file is never replaced")

    c = sub.add_parser("clean", help="remove temporary files left by crashed runs (only ChangeScribe's, only of "
                                     "processes that no longer run)")
    c.add_argument("folders", nargs="*", default=["."], metavar="FOLDER",
                   help="output folders to clean (default: the current one); the temporary folder is always cleaned")
    c.set_defaults(func=_clean)
    return p


def add_run_options(p: argparse.ArgumentParser) -> None:
    """The run options ``detect`` and ``batch`` share (a batch applies them to every unit); each dest is a
    DetectRequest field."""
    p.add_argument("--model", default="default", help="model name (see `changescribe models`) or model card path")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    # Numbers arrive as text and are checked by DetectRequest, whose one-line messages state the valid range.
    p.add_argument("--threshold", default=0.5, help="change probability threshold (between 0 and 1)")
    p.add_argument("--min-area", dest="min_area", default=0.0, help="drop regions smaller than this, in m² (>= 0)")
    p.add_argument("--tile-size", dest="tile_size", default=None,
                   help=f"tile size in pixels, {MIN_TILE_SIZE}..{MAX_TILE_SIZE} (default: the model's)")
    p.add_argument("--overlap", default=None, help="tile overlap in pixels, 0 .. tile size - 1 (default: tile/8)")
    p.add_argument("--batch-size", dest="batch_size", default=8, help="tiles per batch (>= 1; default 8)")
    p.add_argument("--gsd", dest="target_gsd", default=None,
                   help="resample to this GSD in metres (> 0), or 'model' for the model's")
    p.add_argument("--beam-size", dest="beam_size", default=None,
                   help="caption beam size (1 = greedy; default: the model's own, e.g. 3 for SEN, else 1)")
    p.add_argument("--detector", default=None, metavar="NAME_OR_PATH",
                   help="change detector (model name or card path) that makes the mask: replaces a captioner's "
                        "card pairing ('pair_with'), or the captioning model's own change head")
    p.add_argument("--no-captions", dest="captions", action="store_false", help="masks and polygons only")
    p.add_argument("--keep-border-fill", dest="fill_nodata", action="store_false",
                   help="read constant black/white fill along the border of a raster that declares no NoData as "
                        "image (by default it is no data, like the fill of mosaics and warped exports)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace existing output files that ChangeScribe did not write (never an input)")
    p.add_argument("--no-onnxruntime", dest="onnxruntime", action="store_false",
                   help="on the CPU, run the whole model on PyTorch even when onnxruntime is installed (by default "
                        "the change encoder and mask head run on ONNX Runtime there, several times faster)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if not args.verbose:
        # GDAL prints "ERROR 1: ..." itself from threads rasterio's handler does not cover; the error reaches the
        # user once, as the run's one-line message.
        os.environ.setdefault("CPL_LOG", os.devnull)
        for name in ("rasterio", "fiona"):  # their GDAL errors also come back as the exception we report
            logging.getLogger(name).setLevel(logging.CRITICAL)
        # fiona's Cython code prints a failed flush while a GeoPackage closes as a traceback (through
        # sys.excepthook) and an "Exception ignored" line; the failure itself is what the run reports
        quiet = logging.getLogger(__name__).debug
        sys.unraisablehook = lambda unraisable: quiet("ignored: %s", unraisable.exc_value)
        sys.excepthook = lambda kind, value, tb: quiet("ignored: %s: %s", kind.__name__, value)
    import threading

    main_thread = threading.current_thread() is threading.main_thread()  # signals can only be set there
    previous = signal.signal(signal.SIGTERM, _terminate) if main_thread else None
    try:
        return args.func(args)
    except ChangeScribeError as exc:
        print(f"changescribe: error: {exc}", file=sys.stderr)
        return 2
    except Terminated:
        print("changescribe: terminated (SIGTERM); nothing was written", file=sys.stderr)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        print("changescribe: interrupted; nothing was written", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 (the last line of defence: one line, never a traceback)
        logging.getLogger(__name__).debug("unexpected error", exc_info=True)
        print(f"changescribe: error: unexpected {type(exc).__name__}: {' '.join(str(exc).split())} "
              "(run with -v for details)", file=sys.stderr)
        return 2
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
