"""The product's main job: two rasters in, change regions with captions out, as a GeoPackage.

``detect_changes`` = align (:mod:`.raster_pair`) → tiled inference into a probability GeoTIFF
(:mod:`.inference`) → regions (:mod:`.regions`), each captioned and appended to the GeoPackage
(:mod:`.geopackage`) as soon as it is complete → the scene caption and the run record → the GeoPackage renamed
into place. Each step streams, so neither the raster's size nor the number of regions is bounded by memory.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

import rasterio
import torch
from rasterio.windows import Window

from .api import Area, DetectRequest, DetectResult, check_tiling
from .atomic import atomic_path, remove_stale_temporaries, temp_prefix
from .captioning import RegionCaptioner, context_pixels
from .device import describe_device, resolve_device
from .errors import OutOfDeviceMemory, StaleProbabilityError
from .geopackage import RegionLayer, RegionWriter, write_captions, write_run
from .grounding import facts_columns, measure_regions
from .inference import InferenceStats, predict_probability
from .model_api import ChangeModel
from .model_loading import load_model, with_detector
from .onnx_export import cpu_runtime
from .outputs import check_free_space, check_outputs, writing
from .raster_pair import AlignedPair, AlignmentReport, AreaOfInterest, validate_pair
from .progress import RunProgress
from .regions import iter_regions, strip_rows
from .run_control import RunControl
from .version import VERSION

log = logging.getLogger(__name__)

GDAL_CACHE_BYTES = 64 * 2**20
# Cost guesses for the time left before a stage has been measured on this machine (:mod:`.progress`): seconds per
# tile before the first tile, per megapixel of polygon strips, and a caption crop's cost in tiles (both encode a
# pair of model-sized crops; the caption then decodes a sentence).
TILE_SECONDS_GUESS = 0.05
STRIP_SECONDS_PER_MPX = 0.3
CAPTION_TILES = 1.0


@dataclass
class ChangeResult:
    """What a run produced; ``output`` is None when no GeoPackage was asked for.

    ``regions`` is a handle on the regions layer on disk (``len``, ``read``, ``batches``, ``largest``): in
    ``output``, or without one in a scratch GeoPackage removed with the result.
    """

    output: Path | None
    regions: RegionLayer
    scene_caption: str
    summary: str
    alignment: AlignmentReport
    probability: Path | None
    stats: InferenceStats
    metadata: dict = field(default_factory=dict)
    device: str = ""
    reused_probability: bool = False
    notes: list[str] = field(default_factory=list)  # what the run policy did (:mod:`.run`): retries, cache
    flagged: int = 0  # regions with a caption_flag (the count the scene caption gives)

    def summary_result(self) -> DetectResult:
        """The plain-value form the CLI prints, the worker sends and the dock shows."""
        tps = self.stats.tiles_per_second
        return DetectResult(output=str(self.output) if self.output else None, regions=int(len(self.regions)),
                            scene_caption=self.scene_caption, summary=self.summary, flagged=self.flagged,
                            probability=str(self.probability) if self.probability else None,
                            tiles=int(self.stats.tiles), tiles_per_second=round(tps, 2) if math.isfinite(tps) else None,
                            reused_probability=self.reused_probability, device=self.device,
                            alignment=tuple(self.alignment.lines()), seconds=self.metadata.get("seconds"),
                            notes=tuple(self.notes))


def detect_changes(before: str | os.PathLike, after: str | os.PathLike, model: ChangeModel | str = "default",
                   output: str | os.PathLike | None = None, *, threshold: float = 0.5, min_area: float = 0.0,
                   tile_size: int | None = None, overlap: int | None = None, batch_size: int = 8,
                   device: str = "auto", target_gsd: float | str | None = None,
                   probability_output: str | os.PathLike | None = None, captions: bool = True,
                   beam_size: int | None = None, area_of_interest: AreaOfInterest | None = None,
                   reuse_probability: str | os.PathLike | None = None,
                   control: RunControl | None = None,
                   detector: ChangeModel | str | os.PathLike | None = None,
                   overwrite: bool = False, fill_nodata: bool = True, onnxruntime: bool = True) -> ChangeResult:
    """Find, outline and describe what changed between ``before`` and ``after`` (the keyword form of
    :func:`detect`, for Python callers; a model or detector may be given loaded).

    ``target_gsd`` resamples both images to that many metres per pixel; ``"model"`` uses the GSD the
    model was trained at. ``min_area`` is in square metres. ``reuse_probability`` names the probability raster
    of an earlier run on the same inputs and grid: inference is skipped (a new threshold or minimum area is
    then near-instant). Nothing is written unless the whole run succeeds: the GeoPackage and the probability
    raster appear only at the end, complete. ``beam_size`` None decodes with the model's own beam size (its
    card's, e.g. SEN's 3; else greedy). ``detector`` (a model or a name / card path) makes the change mask
    instead of the card's ``pair_with`` partner or the model's own head (:func:`.model_loading.with_detector`).
    """
    area = None
    if area_of_interest is not None:
        area = Area(area_of_interest.geometry.wkt, str(area_of_interest.crs))
    request = DetectRequest(
        before=before, after=after, output=output, model=model.name if isinstance(model, ChangeModel) else model,
        detector=detector.name if isinstance(detector, ChangeModel) else detector, device=device,
        threshold=threshold, min_area=min_area, tile_size=tile_size, overlap=overlap, batch_size=batch_size,
        target_gsd=target_gsd, area_of_interest=area, captions=captions, beam_size=beam_size,
        probability_output=probability_output, reuse_probability=reuse_probability, overwrite=overwrite,
        fill_nodata=fill_nodata, onnxruntime=onnxruntime)
    return detect(request, control, model=model if isinstance(model, ChangeModel) else None,
                  detector=detector if isinstance(detector, ChangeModel) else None,
                  area_of_interest=area_of_interest)


def detect(request: DetectRequest, control: RunControl | None = None, *, model: ChangeModel | None = None,
           detector: ChangeModel | None = None, area_of_interest: AreaOfInterest | None = None) -> ChangeResult:
    """The pipeline for one :class:`~.api.DetectRequest` (no cache, no retries: :func:`.run.run_request` adds those).

    ``model`` / ``detector`` are already loaded models to use instead of the request's names;
    ``area_of_interest`` the request's area as a geometry already made.
    """
    control = control or RunControl()
    r = request
    started = time.perf_counter()
    validate_pair(r.before, r.after)  # cheap checks first: a bad path should not wait for a model to load
    check_run_outputs(r, control)
    dev = resolve_device(r.device)
    try:
        return _detect(r, control, dev, model, detector,
                       area_of_interest if area_of_interest is not None else r.aoi(), started)
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        raise OutOfDeviceMemory(f"out of GPU memory on {describe_device(dev)}: use a smaller tile size or "
                                "--device cpu") from None


def _detect(r: DetectRequest, control: RunControl, dev: torch.device, model: ChangeModel | None,
            detector: ChangeModel | None, area_of_interest: AreaOfInterest | None, started: float) -> ChangeResult:
    model = load_model(r.model, dev) if model is None else model.to(dev)
    if detector is not None or r.detector is not None:
        model = with_detector(model, detector if detector is not None else r.detector, dev)
    beam_size = r.beam_size if r.beam_size is not None else model.default_beam_size
    control.log(f"model {model.name} {model.version} on {describe_device(dev)}")
    with aligned_pair(r, model, area_of_interest) as (pair, tile_size):
        if r.onnxruntime:  # on the CPU: encoder and mask head on ONNX Runtime when it is installed
            torch_model = model
            model = cpu_runtime(model, tile_size, control.log, need=() if r.reuse_probability else ("cd",),
                                tiles=_tiles(pair, tile_size, r.effective_overlap(tile_size)))
            if model is not torch_model:
                control.log("ONNX Runtime runs the change encoder and mask head (--no-onnxruntime: PyTorch only)")
        for line in pair.report.lines():
            control.log(line)
        progress = _plan_progress(control, pair, model, r, tile_size)
        with writing("the temporary files", tempfile.gettempdir()), \
                tempfile.TemporaryDirectory(prefix=temp_prefix()) as tmp:
            if r.reuse_probability is not None:
                prob_path = Path(r.reuse_probability)
                stats = _check_reusable(prob_path, pair)
                control.log(f"reusing the change probability of an earlier run: {prob_path}")
            else:
                prob_path = Path(tmp) / "change_probability.tif"
                # float32 uncompressed is the most the probability raster can take
                check_free_space(tmp, pair.width * pair.height * 4, "the temporary probability raster")
                with writing("the temporary probability raster", tmp):
                    progress.begin("tiles")
                    stats = predict_probability(pair, model, prob_path, tile_size=tile_size, overlap=r.overlap,
                                                batch_size=r.batch_size, control=progress.control("tiles"))
                    progress.finish("tiles")
            created = datetime.now(timezone.utc).isoformat(timespec="seconds")
            # Without an output the regions still stream to disk: a scratch GeoPackage that lives with the result.
            scratch = Path(tempfile.mkdtemp(prefix=temp_prefix("regions"))) if r.output is None else None
            target = Path(r.output) if r.output is not None else scratch / "regions.gpkg"
            prob_out = None
            try:
                with writing("the GeoPackage", target), atomic_path(target, ".tmp.gpkg") as gpkg:
                    captioner = RegionCaptioner(pair, model, r.captions, beam_size, control)
                    per_region = _per_region(r.before, r.after, model.describe(), r.threshold, created)
                    tiles_seconds = progress.rate("tiles")  # the whole pass: its one unit
                    per_tile = tiles_seconds / stats.tiles if tiles_seconds and stats.tiles else TILE_SECONDS_GUESS
                    crop_seconds = CAPTION_TILES * per_tile
                    with RegionWriter(gpkg, pair.grid.crs.to_wkt(), per_region) as writer:
                        progress.begin("strips")
                        for batch in iter_regions(prob_path, threshold=r.threshold, min_area_m2=r.min_area,
                                                  control=progress.control("strips")):
                            pixels = measure_regions(pair, prob_path, batch.geometry, r.threshold)
                            facts = captioner.add(batch["region_id"], batch.geometry, batch["area_m2"], pixels)
                            writer.append(batch.assign(**facts_columns(facts)))
                            if captioner.enabled:  # the crops found so far, extrapolated over the strips left
                                strips = progress.stages["strips"]
                                seen = max(strips.done / max(strips.units, 1), 0.05)
                                progress.plan("captions", captioner.crops() / seen, crop_seconds)
                    if captioner.enabled:
                        progress.plan("captions", captioner.crops(), crop_seconds)
                        progress.begin("captions")
                    write_captions(gpkg, captioner.caption_all(progress.control("captions")))
                    scene_caption, summary = captioner.scene(writer.count, writer.total_area_m2)
                    flagged = captioner.flagged
                    meta = _run_metadata(r.before, r.after, model, dev, pair.report, stats, r.threshold,
                                         r.min_area, tile_size, r.overlap, scene_caption, summary, started,
                                         created)
                    write_run(gpkg, meta)
                    control.check()
                    wanted = Path(r.probability_output) if r.probability_output else None
                    if wanted is not None and wanted.exists() and wanted.samefile(prob_path):
                        prob_out = wanted  # re-running on the cached map: it is already where it belongs
                    else:
                        prob_out = _move_atomic(prob_path, wanted) if wanted is not None else None
            except BaseException:
                if prob_out is not None and r.reuse_probability is None:  # never delete a cache we were given
                    prob_out.unlink(missing_ok=True)
                if scratch is not None:
                    shutil.rmtree(scratch, ignore_errors=True)
                raise
    regions = writer.layer(target)
    if scratch is not None:
        regions.own_folder(scratch)
    out = Path(r.output) if r.output is not None else None
    control.progress(1.0, "done")
    return ChangeResult(output=out, regions=regions, scene_caption=scene_caption, summary=summary,
                        alignment=pair.report, probability=prob_out, stats=stats, metadata=meta,
                        device=describe_device(dev), reused_probability=r.reuse_probability is not None,
                        flagged=flagged)


@contextlib.contextmanager
def aligned_pair(r: DetectRequest, model: ChangeModel,
                 area_of_interest: AreaOfInterest | None) -> Iterator[tuple[AlignedPair, int]]:
    """The request's pair on its grid, opened for ``model``, and the tile size the run uses: what a whole run and a
    chunk of a distributed one (:func:`predict_region`) both read, so they see the same grid and pixels."""
    spec = model.input_spec
    tile_size = r.tile_size or spec.tile_size
    check_tiling(tile_size, r.overlap, r.batch_size)  # again, now that the model's tile size is known
    gsd = spec.gsd if r.target_gsd == "model" else r.target_gsd
    # GDAL's block cache defaults to 5 % of RAM and fills as the raster grows; bound it so memory stays flat.
    with rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_BYTES), \
            AlignedPair(r.before, r.after, bands=spec.bands, target_gsd=gsd,
                        area_of_interest=area_of_interest, fill_nodata=r.fill_nodata) as pair:
        yield pair, tile_size


def predict_region(request: DetectRequest, region: Window, output: str | os.PathLike, model: ChangeModel,
                   control: RunControl | None = None) -> InferenceStats:
    """The change probability of one chunk (``region`` of the request's grid) into the GeoTIFF ``output``, written
    whole or not at all: a unit of a distributed run (:mod:`.batch`), whose chunks put side by side are the map a
    whole run makes (:func:`.inference.predict_probability` runs the tiles across the chunk's edges too)."""
    control = control or RunControl()
    dev = resolve_device(request.device)
    model = model.to(dev)
    if request.detector is not None:
        model = with_detector(model, request.detector, dev)
    with aligned_pair(request, model, request.aoi()) as (pair, tile_size), \
            writing("the probability raster", output), atomic_path(Path(output), ".tmp.tif") as tmp:
        return predict_probability(pair, model, tmp, tile_size=tile_size, overlap=request.overlap,
                                   batch_size=request.batch_size, control=control, region=region)


def _tiles(pair: AlignedPair, tile: int, overlap: int) -> int:
    """About how many tiles inference runs (for the first estimate of the time left)."""
    step = max(1, tile - overlap)
    return math.ceil(pair.width / step) * math.ceil(pair.height / step)


def _plan_progress(control: RunControl, pair: AlignedPair, model: ChangeModel, r: DetectRequest,
                   tile_size: int) -> RunProgress:
    """The run's stages and first cost guesses: tiles (one unit: the whole pass), strips, caption crops."""
    progress = RunProgress(control)
    tiles = _tiles(pair, tile_size, r.effective_overlap(tile_size))
    if r.reuse_probability is None:
        progress.plan("tiles", 1, tiles * TILE_SECONDS_GUESS)
    rows = strip_rows(pair.width)
    progress.plan("strips", math.ceil(pair.height / rows), STRIP_SECONDS_PER_MPX * rows * pair.width / 1e6)
    if r.captions and model.can_caption:
        ctx = context_pixels(pair, model)
        cells = math.ceil(pair.width / ctx) * math.ceil(pair.height / ctx)
        progress.plan("captions", 0.3 * cells, CAPTION_TILES * TILE_SECONDS_GUESS)
    return progress


def _run_metadata(before, after, model: ChangeModel, dev: torch.device, report: AlignmentReport,
                  stats: InferenceStats, threshold: float, min_area: float, tile: int, overlap: int | None,
                  scene_caption: str, summary: str, started: float, created: str) -> dict:
    desc = model.describe()
    return {
        "changescribe_version": VERSION, "created": created, "before": os.path.abspath(before),
        "after": os.path.abspath(after), "model": desc, "device": describe_device(dev),
        "threshold": threshold, "min_area_m2": min_area, "tile_size": tile,
        "overlap": overlap if overlap is not None else tile // 8, "alignment": report.to_dict(),
        "scene_caption": scene_caption, "summary": summary,
        "inference": {"tiles": stats.tiles, "seconds": round(stats.seconds, 3),
                      "tiles_per_second": round(stats.tiles_per_second, 2)},
        "seconds": round(time.perf_counter() - started, 3),
        "per_region": _per_region(before, after, desc, threshold, created),
    }


def _per_region(before, after, desc: dict, threshold: float, created: str) -> dict:
    """The run's fields every region carries, so a region copied out of the layer still says where it came from."""
    return {"before": os.path.basename(str(before)), "after": os.path.basename(str(after)),
            "model_name": desc["name"], "model_version": desc["version"], "threshold": threshold,
            "created": created}


def _check_reusable(path: Path, pair: AlignedPair) -> InferenceStats:
    """A cached probability raster is only valid for exactly the same output grid."""
    try:
        with rasterio.open(path) as src:
            same = (src.crs == pair.grid.crs and src.transform.almost_equals(pair.grid.transform)
                    and (src.width, src.height) == (pair.width, pair.height))
    except rasterio.errors.RasterioIOError as exc:
        raise StaleProbabilityError(f"cannot reuse the probability raster {path}: {exc}") from None
    if not same:
        raise StaleProbabilityError(f"the probability raster {path} was made for another grid; run inference again")
    return InferenceStats(tiles=0, seconds=0.0, model_seconds=0.0, batch_size=0, device="reused")


def _move_atomic(src: Path, dst: Path) -> Path:
    """Copy next to the destination, then rename: the destination is either absent or complete."""
    check_free_space(dst.parent, src.stat().st_size, "the probability raster")
    with writing("the probability raster", dst), atomic_path(dst, ".tmp.tif") as tmp:
        shutil.copyfile(src, tmp)
    return dst


def check_run_outputs(r: DetectRequest, control: RunControl) -> None:
    """Before anything is computed: no output may destroy an input or someone else's file
    (:func:`.outputs.check_outputs`); leftovers of crashed runs beside the outputs are removed."""
    inputs = [r.before, r.after, r.reuse_probability]
    for name in (r.model, r.detector):  # a model given as a file is an input too (card and weights)
        if name and os.path.isfile(name):
            inputs += [name, str(Path(name).with_suffix(".json")), str(Path(name).with_suffix(".safetensors"))]
    outputs = {"GeoPackage": r.output, "probability raster": r.probability_output}
    same = [("probability raster", r.reuse_probability)] if r.reuse_probability else []
    check_outputs(inputs, outputs, overwrite=r.overwrite, allowed_same=same)
    folders = {str(Path(p).parent) for p in outputs.values() if p}
    for leftover in remove_stale_temporaries(*folders):
        control.log(f"removed a temporary file of a crashed run: {leftover}")

