"""Saying in words what changed: captions for given areas of an aligned pair, and for the whole scene.

Captioning models are trained on fixed-size pairs at a given GSD (LEVIR-CC: 256² px at 0.5 m), so every area
is cropped with at least the ground footprint the model was trained on around it, then resampled to the
model's input size. Used by the change pipeline (each detected region) and for areas an analyst draws.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np
import torch
import torch.nn.functional as F
from rasterio.windows import Window

from .device import halving_on_oom
from .model_api import ChangeModel
from .raster_pair import AlignedPair, AlignmentReport
from .run_control import RunControl

Bounds = tuple[float, float, float, float]


def context_pixels(pair: AlignedPair, model: ChangeModel) -> int:
    """Pixels on the pair's grid that cover the ground of one model input (its tile at its GSD)."""
    size = model.input_spec.tile_size
    gsd = model.input_spec.gsd
    grid_gsd = pair.report.output_res[0]
    return int(round(size * gsd / grid_gsd)) if gsd and grid_gsd > 0 else size


def area_window(pair: AlignedPair, bounds: Bounds, min_side: int, margin: float = 1.25) -> Window:
    """A square window centred on ``bounds`` (in the grid CRS), at least ``min_side`` px, kept inside the grid."""
    inv = ~pair.grid.transform
    c0, r0 = inv * (bounds[0], bounds[3])
    c1, r1 = inv * (bounds[2], bounds[1])
    side = int(min(max(min_side, margin * max(c1 - c0, r1 - r0)), pair.width, pair.height))
    side = max(side, 1)
    col = int(np.clip(round((c0 + c1) / 2 - side / 2), 0, pair.width - side))
    row = int(np.clip(round((r0 + r1) / 2 - side / 2), 0, pair.height - side))
    return Window(col, row, side, side)


def _resize(arr: np.ndarray, size: int) -> torch.Tensor:
    t = torch.from_numpy(arr)
    if tuple(t.shape[-2:]) == (size, size):
        return t
    if max(t.shape[-2:]) > size:
        return F.interpolate(t[None], size=(size, size), mode="area")[0]
    return F.interpolate(t[None], size=(size, size), mode="bilinear", align_corners=False)[0]


def caption_windows(pair: AlignedPair, model: ChangeModel, windows: list[Window], beam_size: int = 1,
                    control: RunControl | None = None, batch: int = 16) -> list[str]:
    """One caption per window of the pair's grid, batched (a batch is halved on CUDA out-of-memory)."""
    control = control or RunControl()
    size = model.input_spec.tile_size
    out: list[str] = []
    for i in range(0, len(windows), batch):
        control.check()
        befores, afters = [], []
        for w in windows[i:i + batch]:
            b, a, _ = pair.read(w)
            befores.append(_resize(b, size))
            afters.append(_resize(a, size))
        out += halving_on_oom(lambda b, a: model.caption(b, a, beam_size=beam_size), _concat,
                              torch.stack(befores).to(model.device), torch.stack(afters).to(model.device),
                              what="caption")
        control.progress(min(1.0, (i + batch) / len(windows)), "captioning")
    return out


def _concat(parts: list[list[str]]) -> list[str]:
    return [caption for part in parts for caption in part]


def caption_areas(pair: AlignedPair, model: ChangeModel, areas: Iterable[Bounds], beam_size: int = 1,
                  control: RunControl | None = None) -> list[str]:
    """Captions for areas given by their bounds in the grid CRS (regions, drawn polygons)."""
    ctx = context_pixels(pair, model)
    return caption_windows(pair, model, [area_window(pair, b, ctx) for b in areas], beam_size, control)


def summarise(count: int, total_area_m2: float, report: AlignmentReport) -> str:
    """One plain sentence of what the mask says, independent of any captioner."""
    if count == 0:
        return f"no change detected over {report.overlap_area_m2 / 1e6:.3f} km²"
    share = 100.0 * total_area_m2 / max(report.overlap_area_m2, 1e-9)
    area = f"{total_area_m2 / 1e4:.2f} ha" if total_area_m2 >= 1e4 else f"{total_area_m2:.0f} m²"
    noun = "region" if count == 1 else "regions"
    return (f"{count} changed {noun} covering {area} ({share:.1f} % of the "
            f"{report.overlap_area_m2 / 1e6:.3f} km² compared)")


class RegionCaptioner:
    """Captions regions batch by batch as the pipeline finds them, then the scene once they are all known.

    A scene up to about two model footprints wide is captioned whole; a larger one gets the mask summary plus
    the caption of its largest region (captioning a whole big scene at model size would see nothing), which is
    remembered on the way so no region has to be kept.
    """

    def __init__(self, pair: AlignedPair, model: ChangeModel, enabled: bool = True, beam_size: int = 1,
                 control: RunControl | None = None):
        self.pair, self.model, self.beam_size = pair, model, beam_size
        self.enabled = bool(enabled and model.can_caption)
        # Progress belongs to the stage that feeds the batches; captioning here only honours cancellation.
        self._control = RunControl(is_cancelled=(control or RunControl()).is_cancelled)
        self._ctx = context_pixels(pair, model) if self.enabled else 0
        self._largest = (-1.0, "")

    def caption(self, geoms: Iterable, areas: Iterable[float]) -> list[str]:
        """One caption per region of a batch ("" each when captioning is off)."""
        geoms, areas = list(geoms), [float(a) for a in areas]
        if not self.enabled or not geoms:
            return [""] * len(geoms)
        windows = [area_window(self.pair, g.bounds, self._ctx) for g in geoms]
        out = caption_windows(self.pair, self.model, windows, self.beam_size, self._control)
        i = int(np.argmax(areas))
        if areas[i] > self._largest[0]:
            self._largest = (areas[i], out[i])
        return out

    def scene(self, count: int, total_area_m2: float) -> tuple[str, str]:
        """(scene caption, summary) once every region has been seen; the summary stands in without a captioner."""
        summary = summarise(count, total_area_m2, self.pair.report)
        if not self.enabled:
            return summary, summary
        if max(self.pair.width, self.pair.height) <= 2 * self._ctx or count == 0:
            whole = Window(0, 0, self.pair.width, self.pair.height)
            caption = caption_windows(self.pair, self.model, [whole], self.beam_size, self._control)[0]
        else:
            caption = f"{summary}; largest: {self._largest[1]}"
        return caption or summary, summary
