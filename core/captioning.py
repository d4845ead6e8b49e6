"""Saying in words what changed: captions for given areas of an aligned pair, and for the whole scene.

Captioning models are trained on fixed-size pairs at a given GSD (LEVIR-CC: 256² px at 0.5 m), so every area
is cropped with at least the ground footprint the model was trained on around it, then resampled to the
model's input size. Used by the change pipeline (each detected region) and for areas an analyst draws, which are
grounded exactly as detected regions are (:mod:`.grounding`): facts, change type, caption and flag.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
import torch.nn.functional as F
from rasterio.windows import Window
from shapely.geometry import MultiPolygon, Polygon, box
from shapely.geometry.base import BaseGeometry

from .atomic import temp_prefix
from .device import halving_on_oom
from .geopackage import REGION_FIELDS
from .model_api import ChangeModel
from .grounding import (FACT_FIELDS, GroundedRegion, PixelFacts, RegionFacts, fact_record, ground_region,
                        judgement_record, measure_regions, measure_window, region_facts, scene_paragraph)
from .inference import predict_probability
from .raster_pair import AlignedPair, AlignmentReport
from .regions import area_m2, region_statistics, valid_polygons
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
    """One caption per window of the pair's grid, batched (a batch is halved on CUDA out-of-memory). Equal windows
    are read and captioned once: in a scene no wider than a model footprint, every region's crop is the whole scene."""
    control = control or RunControl()
    size = model.input_spec.tile_size
    keys = [(w.col_off, w.row_off, w.width, w.height) for w in windows]
    unique = list(dict.fromkeys(keys))
    out: dict[tuple, str] = {}
    for i in range(0, len(unique), batch):
        control.check()
        part = unique[i:i + batch]
        befores, afters = [], []
        for key in part:
            b, a, _ = pair.read(Window(*key))
            befores.append(_resize(b, size))
            afters.append(_resize(a, size))
        out.update(zip(part, halving_on_oom(lambda b, a: model.caption(b, a, beam_size=beam_size), _concat,
                                            torch.stack(befores).to(model.device),
                                            torch.stack(afters).to(model.device), what="caption")))
        control.progress(min(1.0, (i + batch) / len(unique)), "captioning")
    return [out[k] for k in keys]


def _concat(parts: list[list[str]]) -> list[str]:
    return [caption for part in parts for caption in part]


def decoder_captions(pair: AlignedPair, model: ChangeModel, areas: Iterable[Bounds], beam_size: int = 1,
                     control: RunControl | None = None) -> list[str]:
    """The decoder's sentence for each area given by its bounds in the grid CRS, from a crop centred on it (an
    annotation's suggestion; :func:`caption_areas` grounds them)."""
    ctx = context_pixels(pair, model)
    return caption_windows(pair, model, [area_window(pair, b, ctx) for b in areas], beam_size, control)


# The fields a given area gets (:func:`caption_areas`), named and typed as the regions layer of a run names them.
AREA_FIELDS = {name: REGION_FIELDS[name] for name in ("area_m2", "mean_prob", "max_prob", "caption", *FACT_FIELDS)}


@dataclass(frozen=True)
class AreaCaption:
    """A given area grounded like a detected region: its facts, type, grounded caption, the decoder's sentence and
    flag, and the model's change probability inside it (None for a captioner that cannot detect)."""

    area_m2: float
    mean_prob: float | None
    max_prob: float | None
    facts: RegionFacts
    grounded: GroundedRegion

    def record(self) -> dict:
        """The area's :data:`AREA_FIELDS` values, as a run's regions layer stores them."""
        rounded = {k: None if v is None else round(float(v), 4) for k, v in (("mean_prob", self.mean_prob),
                                                                           ("max_prob", self.max_prob))}
        values = {"area_m2": round(self.area_m2, 2), **rounded, **fact_record(self.facts),
                  **judgement_record(self.grounded)}
        return {name: values[name] for name in AREA_FIELDS}


def caption_areas(pair: AlignedPair, model: ChangeModel, areas: Iterable[BaseGeometry | None], beam_size: int = 1,
                  control: RunControl | None = None, threshold: float = 0.5,
                  batch_size: int = 8) -> list[AreaCaption | None]:
    """Each area (a polygon in the grid CRS: drawn, or another tool's) captioned and grounded as a detected region
    is: its part in the compared area (the pair's grid) gets its decoder sentence from a crop centred on it,
    checked against its facts (:func:`.grounding.ground_region`). None for an area with nothing in the grid (or
    given as None).

    A model that can detect runs over each area's :func:`.grounding.measure_window` (the tiles of the whole grid
    that reach it, so its probabilities are a whole run's): the mean and max probability inside the area, and the
    mask at ``threshold`` that gives its ``objects`` (0: the model sees no change there, and its type is
    :data:`.grounding.NO_CHANGE`) and the unchanged ground its pixel changes are measured against. A captioner that
    cannot detect gets the pixel facts alone (probabilities and ``objects`` None).
    """
    control = control or RunControl()
    given = [in_scene(pair, g) for g in areas]
    geoms = [g for g in given if g is not None]
    n = len(geoms)
    if model.can_detect:
        pixels: list[PixelFacts | None] = []
        means, maxes = [], []
        with tempfile.TemporaryDirectory(prefix=temp_prefix()) as tmp:
            for i, geom in enumerate(geoms):
                path = Path(tmp) / f"area-{i}.tif"
                predict_probability(pair, model, path, batch_size=batch_size, region=measure_window(pair, geom),
                                    control=control.stage(0.5 * i / n, 0.5 * (i + 1) / n))
                pixels += measure_regions(pair, path, [geom], threshold)
                mean, peak = region_statistics(path, [geom])
                means.append(float(mean[0]))
                maxes.append(float(peak[0]))
                path.unlink()
    else:
        pixels = measure_regions(pair, None, geoms, threshold)
        means = maxes = [None] * n
    scene = scene_bounds(pair)
    sizes = area_m2(geoms, pair.grid.crs) if geoms else []
    texts = decoder_captions(pair, model, [tuple(g.bounds) for g in geoms], beam_size,
                             control.stage(0.5 if model.can_detect else 0.0, 1.0))
    grounded = []
    for geom, size, px, mean, peak, text in zip(geoms, sizes, pixels, means, maxes, texts):
        facts = region_facts(geom, float(size), scene, px)
        grounded.append(AreaCaption(float(size), mean, peak, facts, ground_region(text, facts)))
    found = iter(grounded)
    return [next(found) if g is not None else None for g in given]


def in_scene(pair: AlignedPair, geom: BaseGeometry | None) -> Polygon | MultiPolygon | None:
    """The polygonal part of ``geom`` (grid CRS) inside the pair's grid, or None when nothing of it is."""
    if geom is None or geom.is_empty:
        return None
    parts = valid_polygons(geom.intersection(box(*scene_bounds(pair))))
    return None if not parts else parts[0] if len(parts) == 1 else MultiPolygon(parts)


def scene_bounds(pair: AlignedPair) -> Bounds:
    """The compared area's bounds in the grid CRS: what position words (north-west, centre...) are relative to."""
    t, w, h = pair.grid.transform, pair.width, pair.height
    return t.c, t.f + t.e * h, t.c + t.a * w, t.f


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
    """Captions a run's regions once they are all found, then the scene.

    Captioning each region from its own crop costs one model pass per region, which made captions dominate a run
    with hundreds of small regions. Regions are therefore grouped: one that fits in a model footprint (the
    model's tile at its GSD, :func:`context_pixels`) shares one crop, and so one caption, with the other small
    regions whose centres fall in the same footprint-sized cell of the grid; a larger region gets its own crop.
    Crops are then at most about one per model footprint of changed ground, like the tiles of inference. When
    that is still more than :attr:`CROPS_PER_CELL` of the footprint cells of the grid (a scene full of change),
    the cells grow to 1.5, 2, 3... footprints and the regions that fit in one share it, so captioning costs at most
    about that share of a model pass per footprint: a fraction of inference, whatever the number of regions. Each
    region records how many regions its caption's crop covers (``caption_regions``: 1 = its own crop, 0 = no
    caption). Only the bounds and facts of the regions are kept (a few hundred bytes each), never their geometry.

    Every region's decoder sentence is then checked against its facts (:func:`.grounding.ground_region`): it gets
    a change type, a caption built from type and facts, the decoder's sentence as ``model_caption`` and a flag when
    the two disagree. The scene caption sums the regions up by type (:func:`.grounding.scene_paragraph`).
    """

    MARGIN = 1.25  # a crop is this much wider than what it must show
    CROPS_PER_CELL = 0.35  # at most this many crops per footprint cell of the grid (when cells can grow enough)
    CELL_SCALES = (1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0)

    def __init__(self, pair: AlignedPair, model: ChangeModel, enabled: bool = True, beam_size: int = 1,
                 control: RunControl | None = None):
        self.pair, self.model, self.beam_size = pair, model, beam_size
        self.enabled = bool(enabled and model.can_caption)
        self._cancel = (control or RunControl()).is_cancelled
        self._ctx = context_pixels(pair, model) if self.enabled else 0
        self._ids: list[int] = []
        self._bounds: list[Bounds] = []
        self._areas: list[float] = []
        self._facts: list[RegionFacts] = []  # size, shape, scene position: what a caption must not contradict
        self._scene = scene_bounds(pair)
        self._cells: set[tuple[int, int]] = set()
        self._large = 0
        self._grounded: list[GroundedRegion | None] = []

    def add(self, region_ids: Iterable[int], geoms: Iterable, areas: Iterable[float],
            pixels: Iterable[PixelFacts | None] | None = None) -> list[RegionFacts]:
        """Remember a batch of finished regions (their ids, facts and, to caption them, bounds) for
        :meth:`caption_all`; returns their facts (:mod:`.grounding`), which the regions layer stores."""
        out = []
        geoms = list(geoms)
        for rid, geom, area, px in zip(region_ids, geoms, areas, pixels if pixels is not None else [None] * len(geoms)):
            self._ids.append(int(rid))
            self._areas.append(float(area))
            self._facts.append(region_facts(geom, float(area), self._scene, px))
            out.append(self._facts[-1])
            if not self.enabled:
                continue
            self._bounds.append(tuple(geom.bounds))
            key = self._cell(self._bounds[-1])
            if key is None:
                self._large += 1
            else:
                self._cells.add(key)
        return out

    def crops(self) -> int:
        """About how many crops the regions seen so far need (what the captioning stage will cost)."""
        return min(self._large + len(self._cells), max(1, int(self._budget())))

    def _budget(self) -> float:
        cells = math.ceil(self.pair.width / self._ctx) * math.ceil(self.pair.height / self._ctx)
        return self.CROPS_PER_CELL * cells

    def _groups(self) -> list[list[int]]:
        """Indexes of the regions that share each crop, at the smallest cell scale within the budget."""
        for scale in self.CELL_SCALES:
            groups: dict[object, list[int]] = {}
            for i, b in enumerate(self._bounds):
                key = self._cell(b, scale)
                groups.setdefault(("own", i) if key is None else key, []).append(i)
            if len(groups) <= self._budget():
                break
        return list(groups.values())

    def caption_all(self, control: RunControl | None = None) -> list[tuple[int, int, GroundedRegion]]:
        """(region_id, regions sharing its decoder caption's crop, its type, captions and flag) for every region
        added; without a captioner the type still comes from the facts and the captions stay empty."""
        control = control or RunControl()
        if not self.enabled or not self._ids:
            self._grounded = [ground_region("", f) for f in self._facts]
            return [(rid, 0, GroundedRegion(g.change_type, g.type_confidence, "", "", ""))
                    for rid, g in zip(self._ids, self._grounded)]
        members = self._groups()
        windows = []
        for idx in members:
            bs = [self._bounds[i] for i in idx]
            union = (min(b[0] for b in bs), min(b[1] for b in bs), max(b[2] for b in bs), max(b[3] for b in bs))
            windows.append(area_window(self.pair, union, self._ctx, self.MARGIN))
        n_regions = len(self._ids)
        covered = np.cumsum([len(idx) for idx in members])

        def report(fraction: float, _message: str) -> None:
            done = int(covered[min(len(covered) - 1, max(0, int(round(fraction * len(members))) - 1))])
            control.progress(fraction, f"captions: {done}/{n_regions} regions")

        caps = caption_windows(self.pair, self.model, windows, self.beam_size,
                               RunControl(on_progress=report, is_cancelled=self._cancel))
        grounded: list[GroundedRegion | None] = [None] * len(self._ids)
        shares = [0] * len(self._ids)
        for idx, caption in zip(members, caps):
            # the decoder saw a crop: its sentence is checked against each region's own facts (core.grounding)
            for i in idx:
                grounded[i], shares[i] = ground_region(caption, self._facts[i]), len(idx)
        self._grounded = grounded
        return [(rid, n, g) for rid, n, g in zip(self._ids, shares, grounded)]

    def _cell(self, bounds: Bounds, scale: float = 1.0) -> tuple[int, int] | None:
        """The grid cell (``scale`` footprints wide) of a region's centre; None for a region wider than a crop."""
        inv = ~self.pair.grid.transform
        c0, r0 = inv * (bounds[0], bounds[3])
        c1, r1 = inv * (bounds[2], bounds[1])
        side = scale * self._ctx
        if self.MARGIN * max(c1 - c0, r1 - r0) > side:
            return None
        return int((r0 + r1) / 2 // side), int((c0 + c1) / 2 // side)

    def scene(self, count: int, total_area_m2: float) -> tuple[str, str]:
        """(scene caption, summary) once every region has been captioned (:meth:`caption_all`): the summary, then
        the regions by type, where they concentrate, the largest and how many decoder captions were flagged
        (:func:`.grounding.scene_paragraph`); the summary alone without a captioner."""
        summary = summarise(count, total_area_m2, self.pair.report)
        if not self.enabled or not count:
            return summary, summary
        pairs = [(f, g) for f, g in zip(self._facts, self._grounded) if g is not None]
        return scene_paragraph(summary, pairs, self.flagged), summary

    @property
    def flagged(self) -> int:
        """How many regions carry a ``caption_flag`` (0 before :meth:`caption_all`, and without a captioner)."""
        return sum(1 for g in self._grounded if g is not None and g.caption_flag)
