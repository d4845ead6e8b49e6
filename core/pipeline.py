"""The product's main job: two rasters in, change regions with captions out, as a GeoPackage.

``detect_changes`` = align (:mod:`.raster_pair`) → tiled inference into a probability GeoTIFF
(:mod:`.inference`) → regions (:mod:`.regions`) → captions for the scene and each region → atomic
GeoPackage (:mod:`.geopackage`). Each step streams, so the raster size is bounded by disk, not memory.
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

import geopandas as gpd
import numpy as np
import torch
import torch.nn.functional as F
from rasterio.windows import Window

from .device import describe_device, resolve_device
from .errors import ChangeScribeError
from .geopackage import write_result
from .inference import InferenceStats, predict_probability
from .model_api import ChangeModel
from .model_loading import load_model
from .raster_pair import AlignedPair, AlignmentReport, validate_pair
from .regions import change_regions
from .run_control import RunControl
from .version import VERSION

log = logging.getLogger(__name__)


@dataclass
class ChangeResult:
    """What a run produced; ``output`` is None when no GeoPackage was asked for."""

    output: Path | None
    regions: gpd.GeoDataFrame
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
                   beam_size: int = 1, control: RunControl | None = None) -> ChangeResult:
    """Find, outline and describe what changed between ``before`` and ``after``.

    ``target_gsd`` resamples both images to that many metres per pixel; ``"model"`` uses the GSD the
    model was trained at. ``min_area`` is in square metres. Nothing is written unless the whole run
    succeeds: the GeoPackage and the probability raster appear only at the end, complete.
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
    control.log(f"model {model.name} {model.version} on {describe_device(dev)}")
    spec = model.input_spec
    gsd = spec.gsd if target_gsd == "model" else target_gsd
    with AlignedPair(before, after, bands=spec.bands, target_gsd=gsd) as pair:
        for line in pair.report.lines():
            control.log(line)
        with tempfile.TemporaryDirectory(prefix="changescribe-") as tmp:
            prob_path = Path(tmp) / "change_probability.tif"
            stats = predict_probability(pair, model, prob_path, tile_size=tile_size, overlap=overlap,
                                        batch_size=batch_size, control=control.stage(0.0, 0.75))
            regions = change_regions(prob_path, threshold=threshold, min_area_m2=min_area,
                                     control=control.stage(0.75, 0.85))
            scene_caption, region_captions = _describe(pair, model, regions, captions, beam_size,
                                                       control.stage(0.85, 0.98))
            regions["caption"] = region_captions
            summary = summarise(regions, pair.report)
            if not scene_caption:
                scene_caption = summary
            meta = _run_metadata(before, after, model, dev, pair.report, stats, threshold, min_area,
                                 tile_size or spec.tile_size, overlap, scene_caption, summary, started)
            for key in ("before", "after", "model_name", "model_version", "threshold", "created"):
                regions[key] = meta["per_region"][key]
            control.check()
            prob_out = _move_atomic(prob_path, Path(probability_output)) if probability_output else None
            try:
                out = write_result(output, regions, meta) if output is not None else None
            except BaseException:
                if prob_out is not None:
                    prob_out.unlink(missing_ok=True)
                raise
    control.progress(1.0, "done")
    return ChangeResult(output=out, regions=regions, scene_caption=scene_caption, summary=summary,
                        alignment=pair.report, probability=prob_out, stats=stats, metadata=meta)


def summarise(regions: gpd.GeoDataFrame, report: AlignmentReport) -> str:
    """One plain sentence of what the mask says, independent of any captioner."""
    n = len(regions)
    if n == 0:
        return f"no change detected over {report.overlap_area_m2 / 1e6:.3f} km²"
    total = float(regions["area_m2"].sum())
    share = 100.0 * total / max(report.overlap_area_m2, 1e-9)
    noun = "region" if n == 1 else "regions"
    return (f"{n} changed {noun} covering {_area_words(total)} ({share:.1f} % of the "
            f"{report.overlap_area_m2 / 1e6:.3f} km² compared)")


def _area_words(m2: float) -> str:
    return f"{m2 / 1e4:.2f} ha" if m2 >= 1e4 else f"{m2:.0f} m²"


def _describe(pair: AlignedPair, model: ChangeModel, regions: gpd.GeoDataFrame, captions: bool, beam_size: int,
              control: RunControl) -> tuple[str, list[str]]:
    """Scene caption and one caption per region, from crops at the model's input size."""
    if not (captions and model.can_caption):
        return "", [""] * len(regions)
    size = model.input_spec.tile_size
    windows = [_region_window(pair, geom.bounds, size) for geom in regions.geometry]
    whole = Window(0, 0, pair.width, pair.height)
    scene_small = max(pair.width, pair.height) <= 2 * size
    if scene_small or not windows:
        windows = [whole] + windows
    out = _caption_windows(pair, model, windows, size, beam_size, control)
    if scene_small or not len(regions):
        return out[0], out[1:]
    return f"{summarise(regions, pair.report)}; largest: {out[0]}", out


def _region_window(pair: AlignedPair, bounds: tuple[float, float, float, float], size: int) -> Window:
    """A square window around a region, at least one model tile wide (context, as in training)."""
    inv = ~pair.grid.transform
    c0, r0 = inv * (bounds[0], bounds[3])
    c1, r1 = inv * (bounds[2], bounds[1])
    side = int(min(max(size, 1.25 * max(c1 - c0, r1 - r0)), pair.width, pair.height))
    cc, rc = (c0 + c1) / 2, (r0 + r1) / 2
    col = int(np.clip(round(cc - side / 2), 0, pair.width - side))
    row = int(np.clip(round(rc - side / 2), 0, pair.height - side))
    return Window(col, row, side, side)


def _caption_windows(pair: AlignedPair, model: ChangeModel, windows: list[Window], size: int, beam_size: int,
                     control: RunControl, batch: int = 16) -> list[str]:
    out: list[str] = []
    for i in range(0, len(windows), batch):
        control.check()
        befores, afters = [], []
        for w in windows[i:i + batch]:
            b, a, _ = pair.read(w)
            befores.append(_resize(b, size))
            afters.append(_resize(a, size))
        dev = model.device
        with torch.inference_mode():
            out += model.caption(torch.stack(befores).to(dev), torch.stack(afters).to(dev), beam_size=beam_size)
        control.progress(min(1.0, (i + batch) / len(windows)), "captioning regions")
    return out


def _resize(arr: np.ndarray, size: int) -> torch.Tensor:
    t = torch.from_numpy(arr)
    if t.shape[-2:] == (size, size):
        return t
    mode = "area" if max(t.shape[-2:]) > size else "bilinear"
    kw = {} if mode == "area" else {"align_corners": False}
    return F.interpolate(t[None], size=(size, size), mode=mode, **kw)[0]


def _run_metadata(before, after, model: ChangeModel, dev: torch.device, report: AlignmentReport,
                  stats: InferenceStats, threshold: float, min_area: float, tile: int, overlap: int | None,
                  scene_caption: str, summary: str, started: float) -> dict:
    created = datetime.now(timezone.utc).isoformat(timespec="seconds")
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
        "per_region": {"before": os.path.basename(str(before)), "after": os.path.basename(str(after)),
                       "model_name": desc["name"], "model_version": desc["version"], "threshold": threshold,
                       "created": created},
    }


def _move_atomic(src: Path, dst: Path) -> Path:
    """Copy next to the destination, then rename: the destination is either absent or complete."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dst.stem}.", suffix=".tmp.tif", dir=dst.parent)
    os.close(fd)
    try:
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return dst

