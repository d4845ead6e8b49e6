"""The product's main job: two rasters in, change regions with captions out, as a GeoPackage.

``detect_changes`` = align (:mod:`.raster_pair`) → tiled inference into a probability GeoTIFF
(:mod:`.inference`) → regions (:mod:`.regions`), each captioned and appended to the GeoPackage
(:mod:`.geopackage`) as soon as it is complete → the scene caption and the run record → the GeoPackage renamed
into place. Each step streams, so neither the raster's size nor the number of regions is bounded by memory.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import rasterio
import torch

from .atomic import atomic_path
from .captioning import RegionCaptioner
from .device import describe_device, resolve_device
from .errors import ChangeScribeError
from .geopackage import RegionLayer, RegionWriter, write_run
from .inference import InferenceStats, predict_probability
from .model_api import ChangeModel
from .model_loading import load_model
from .models.pairing import with_detector
from .raster_pair import AlignedPair, AlignmentReport, AreaOfInterest, validate_pair
from .regions import iter_regions
from .run_control import RunControl
from .version import VERSION

log = logging.getLogger(__name__)

GDAL_CACHE_BYTES = 64 * 2**20


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


def detect_changes(before: str | os.PathLike, after: str | os.PathLike, model: ChangeModel | str = "default",
                   output: str | os.PathLike | None = None, *, threshold: float = 0.5, min_area: float = 0.0,
                   tile_size: int | None = None, overlap: int | None = None, batch_size: int = 8,
                   device: str = "auto", target_gsd: float | str | None = None,
                   probability_output: str | os.PathLike | None = None, captions: bool = True,
                   beam_size: int | None = None, area_of_interest: AreaOfInterest | None = None,
                   reuse_probability: str | os.PathLike | None = None,
                   control: RunControl | None = None,
                   detector: ChangeModel | str | os.PathLike | None = None) -> ChangeResult:
    """Find, outline and describe what changed between ``before`` and ``after``.

    ``target_gsd`` resamples both images to that many metres per pixel; ``"model"`` uses the GSD the
    model was trained at. ``min_area`` is in square metres. ``reuse_probability`` names the probability raster
    of an earlier run on the same inputs and grid: inference is skipped (a new threshold or minimum area is
    then near-instant). Nothing is written unless the whole run succeeds: the GeoPackage and the probability
    raster appear only at the end, complete. ``beam_size`` None decodes with the model's own beam size (its
    card's, e.g. SEN's 3; else greedy). ``detector`` (a model or a name / card path) makes the change mask
    instead of the card's ``pair_with`` partner or the model's own head (:func:`.models.pairing.with_detector`).
    """
    control = control or RunControl()
    if not 0.0 < threshold < 1.0:
        raise ChangeScribeError(f"threshold must be between 0 and 1, got {threshold}")
    if output is not None and Path(output).suffix.lower() != ".gpkg":
        raise ChangeScribeError(f"output must be a GeoPackage (.gpkg): {output}")
    started = time.perf_counter()
    validate_pair(before, after)  # cheap checks first: a bad path should not wait for a model to load
    dev = resolve_device(device)
    if not isinstance(model, ChangeModel):
        model = load_model(model, dev)
    else:
        model = model.to(dev)
    if detector is not None:
        model = with_detector(model, detector, dev)
    if beam_size is None:
        beam_size = int(getattr(model, "default_beam_size", 1))
    control.log(f"model {model.name} {model.version} on {describe_device(dev)}")
    spec = model.input_spec
    gsd = spec.gsd if target_gsd == "model" else target_gsd
    # GDAL's block cache defaults to 5 % of RAM and fills as the raster grows; bound it so memory stays flat.
    with rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_BYTES), \
            AlignedPair(before, after, bands=spec.bands, target_gsd=gsd, area_of_interest=area_of_interest) as pair:
        for line in pair.report.lines():
            control.log(line)
        with tempfile.TemporaryDirectory(prefix="changescribe-") as tmp:
            if reuse_probability is not None:
                prob_path = Path(reuse_probability)
                stats = _check_reusable(prob_path, pair)
                control.log(f"reusing the change probability of an earlier run: {prob_path}")
            else:
                prob_path = Path(tmp) / "change_probability.tif"
                stats = predict_probability(pair, model, prob_path, tile_size=tile_size, overlap=overlap,
                                            batch_size=batch_size, control=control.stage(0.0, 0.75))
            created = datetime.now(timezone.utc).isoformat(timespec="seconds")
            # Without an output the regions still stream to disk: a scratch GeoPackage that lives with the result.
            scratch = Path(tempfile.mkdtemp(prefix="changescribe-regions-")) if output is None else None
            target = Path(output) if output is not None else scratch / "regions.gpkg"
            prob_out = None
            try:
                with atomic_path(target, ".tmp.gpkg") as gpkg:
                    captioner = RegionCaptioner(pair, model, captions, beam_size, control)
                    per_region = _per_region(before, after, model.describe(), threshold, created)
                    with RegionWriter(gpkg, pair.grid.crs.to_wkt(), per_region) as writer:
                        for batch in iter_regions(prob_path, threshold=threshold, min_area_m2=min_area,
                                                  control=control.stage(0.75, 0.98)):
                            batch["caption"] = captioner.caption(batch.geometry, batch["area_m2"])
                            writer.append(batch)
                    scene_caption, summary = captioner.scene(writer.count, writer.total_area_m2)
                    meta = _run_metadata(before, after, model, dev, pair.report, stats, threshold, min_area,
                                         tile_size or spec.tile_size, overlap, scene_caption, summary, started,
                                         created)
                    write_run(gpkg, meta)
                    control.check()
                    wanted = Path(probability_output) if probability_output else None
                    if wanted is not None and wanted.exists() and wanted.samefile(prob_path):
                        prob_out = wanted  # re-running on the cached map: it is already where it belongs
                    else:
                        prob_out = _move_atomic(prob_path, wanted) if wanted is not None else None
            except BaseException:
                if prob_out is not None and reuse_probability is None:  # never delete a cache we were given
                    prob_out.unlink(missing_ok=True)
                if scratch is not None:
                    shutil.rmtree(scratch, ignore_errors=True)
                raise
    regions = writer.layer(target)
    if scratch is not None:
        regions.own_folder(scratch)
    out = Path(output) if output is not None else None
    control.progress(1.0, "done")
    return ChangeResult(output=out, regions=regions, scene_caption=scene_caption, summary=summary,
                        alignment=pair.report, probability=prob_out, stats=stats, metadata=meta)


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
        raise ChangeScribeError(f"cannot reuse the probability raster {path}: {exc}") from None
    if not same:
        raise ChangeScribeError(f"the probability raster {path} was made for another grid; run inference again")
    return InferenceStats(tiles=0, seconds=0.0, model_seconds=0.0, batch_size=0, device="reused")


def _move_atomic(src: Path, dst: Path) -> Path:
    """Copy next to the destination, then rename: the destination is either absent or complete."""
    with atomic_path(dst, ".tmp.tif") as tmp:
        shutil.copyfile(src, tmp)
    return dst

