"""Region captions an analyst can trust: facts measured on the mask and the pixels, a change type, flags.

A caption decoder sees a crop, not the region: it may call a compact blob "a road", say "no difference" about a
region the model itself reported, or place the change in "the bottom right corner" of its crop. This module
measures what the pipeline already holds for each region, with shapely, numpy and scipy (no second model run):

* the polygon: area, shape class (compact / elongated / linear, from compactness and elongation), main
  orientation, and the position of its centroid in the scene as compass words;
* the pixels inside it, before vs after: brightness, greenness (excess green on RGB, NDVI when a near-infrared
  band is read) and texture, and the number of separate objects (connected parts of the unsmoothed mask).

From these facts and the decoder's own class words a rule-based classifier gives each region a change type with a
confidence; a type the facts contradict is never used. The region caption is then built from type and facts ("new
building, about 240 m², compact, in the north-west part of the scene"); the decoder's sentence is kept as
``model_caption`` with its crop-relative position words replaced by the region's position in the scene; a decoder
sentence that contradicts the facts gets a ``caption_flag`` saying why. :func:`scene_paragraph` sums the regions up
by type for the scene caption. One piece of code serves the pipeline, the CLI, Processing (detected regions and the
polygons given to Caption regions), the dock and the report.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterable

import numpy as np
from scipy import ndimage

if TYPE_CHECKING:
    from rasterio.windows import Window

    from .raster_pair import AlignedPair

__all__ = ["CHANGE_TYPES", "PixelFacts", "RegionFacts", "GroundedRegion", "region_facts", "measure_pixels",
           "measure_regions", "compass_words", "orientation_words", "classify_change", "decoder_type", "ground_region",
           "ground_caption", "scene_paragraph", "is_no_change", "area_words", "FACT_FIELDS", "NO_CHANGE",
           "measure_window"]

Bounds = tuple[float, float, float, float]

# The change types, most specific first; "other change" is what a region gets when no type is supported.
NEW_BUILDING, BUILDING_REMOVED, NEW_ROAD = "new building", "building removed or damaged", "new road"
VEG_LOST, VEG_GAINED, BARE_SOIL, WATER, OTHER = ("vegetation lost", "vegetation gained", "bare soil or earthworks",
                                                 "water", "other change")
CHANGE_TYPES = (NEW_BUILDING, BUILDING_REMOVED, NEW_ROAD, VEG_LOST, VEG_GAINED, BARE_SOIL, WATER, OTHER)
# What a given area (drawn, not detected) is when the model's change mask has no pixel inside it: no type is
# guessed from its pixels then, or a fluent "new building" would describe ground the model saw unchanged.
NO_CHANGE = "no change"
_PLURAL = {NEW_BUILDING: "new buildings", BUILDING_REMOVED: "buildings removed or damaged", NEW_ROAD: "new roads",
           VEG_LOST: "vegetation lost", VEG_GAINED: "vegetation gained", BARE_SOIL: "bare soil or earthworks",
           WATER: "water", OTHER: "other changes", NO_CHANGE: "areas without change"}

_NO_CHANGE = re.compile(r"\b(no (difference|change)|nothing (has )?changed|(the )?same as before|(seem )?identical|"
                        r"remains? (the same|unchanged)|unchanged)\b")
_LINEAR_WORDS = re.compile(r"\b(roads?|path(way)?s?|streets?|lanes?|crossroads?|highways?|railways?|avenues?|"
                           r"rivers?|bridges?)\b")
_COMPACT_WORDS = re.compile(r"\b(houses?|buildings?|villas?|bungalows?|constructions?|rooms?|apartments?|"
                            r"storage tanks?|tanks?)\b")
_VEG_WORDS = re.compile(r"\b(trees?|vegetation|grass(land)?|forests?|woods?|woodland|plants?|greenery|bushe?s?|"
                        r"meadows?|green)\b")
_WATER_WORDS = re.compile(r"\b(water|ponds?|lakes?|pools?|reservoirs?)\b")
_SOIL_WORDS = re.compile(r"\b(bare ?land|bare soil|soil|earth|sand|construction site|wasteland|desert)\b")
_GONE_WORDS = re.compile(r"\b(remov\w*|demolish\w*|destroy\w*|disappear\w*|torn down|cut( down)?|clear\w*|"
                         r"damag\w*|collaps\w*|gone|replaced by|filled|razed|flattened|withered)\b")
_NEW_WORDS = re.compile(r"\b(built|constructed|construct\w*|appear\w*|new|planted|grow\w*|added|erected|emerg\w*)\b")
# crop-relative position phrases of LEVIR-CC-style captions
_POSITION = re.compile(r"\s*\b(in|at|on|to|near|from|along)\s+the\s+((top|bottom|upper|lower|left|right|middle|"
                       r"center|centre)(\s+(left|right|middle|center|centre))?)(\s+(corner|side|part|edge|half))?"
                       r"(\s+of\s+the\s+(scene|image|picture|area))?\b")

# Thresholds of the rules, on the scales of :class:`PixelFacts` (brightness and texture 0..1, greenness as
# chromatic excess green (2g - r - b) / (r + g + b), or NDVI). Set on generated scenes (seeds 0..39), measured on
# others (README, "Grounded captions").
VEGETATED = 0.12      # mean excess green above which the ground counts as vegetated
WOODED = 0.25         # ... as densely vegetated (canopy)
GREEN_STEP = 0.03     # a change of mean excess green at least this large is a real greenness change
BRIGHT_STEP = 0.04    # ... of mean brightness
TEXTURE_STEP = 0.004  # ... of mean texture (gradient magnitude per pixel)
DARK = 0.22           # mean brightness below which smooth ground may be water
SMOOTH = 0.03         # mean texture below which ground counts as smooth
CONFIDENT = 0.5       # a type below this confidence is reported as "other change"
BACKGROUND_MARGIN = 32  # pixels of unchanged ground around a region (at most) that say what changed everywhere
MIN_BACKGROUND = 16     # fewer background pixels than this: no background correction


@dataclass(frozen=True)
class PixelFacts:
    """What changed in a region's pixels, before vs after (means over the region's valid pixels)."""

    brightness_before: float
    brightness_after: float
    greenness_before: float
    greenness_after: float
    texture_before: float
    texture_after: float
    # connected parts of the unsmoothed mask (prob >= threshold) inside the region: 0 when a given area has none,
    # None when no mask was measured (a captioner without a change head)
    objects: int | None
    greenness_index: str = "ExG"  # "ExG" (excess green on RGB) or "NDVI" (with a near-infrared band)
    # the same changes on the unchanged ground around the region (a season or illumination shift between the
    # dates): the region's changes are counted over and above them
    background_brightness_change: float = 0.0
    background_greenness_change: float = 0.0
    background_texture_change: float = 0.0

    @property
    def d_brightness(self) -> float:
        return self.brightness_after - self.brightness_before - self.background_brightness_change

    @property
    def d_greenness(self) -> float:
        return self.greenness_after - self.greenness_before - self.background_greenness_change

    @property
    def d_texture(self) -> float:
        return self.texture_after - self.texture_before - self.background_texture_change


@dataclass(frozen=True)
class RegionFacts:
    """What a region's polygon (and, when measured, its pixels) says: size, shape, orientation, place."""

    area_m2: float
    compactness: float   # 4 pi A / P^2: 1 for a disc, ~0.785 for a square, -> 0 for a thin strip
    elongation: float    # long / short side of the minimum rotated rectangle (1 = as wide as long)
    position: str        # compass words of the centroid in the scene, e.g. "north-west part of the scene"
    orientation_deg: float = 0.0  # bearing of the long axis, 0..180 (0 north-south, 90 east-west)
    fx: float = 0.5      # centroid as a fraction of the scene's width (west -> east) ...
    fy: float = 0.5      # ... and height (north -> south)
    pixels: PixelFacts | None = None

    @property
    def shape(self) -> str:
        """compact, elongated or linear (thresholds on elongation and compactness)."""
        if self.elongation >= 6 or self.compactness < 0.12:
            return "linear"
        if self.elongation >= 2.5:
            return "elongated"
        return "compact"

    @property
    def orientation(self) -> str:
        """The long axis in words ("east–west"); empty for a compact region, which has none worth saying."""
        return orientation_words(self.orientation_deg) if self.shape != "compact" else ""

    @property
    def objects(self) -> int | None:
        return self.pixels.objects if self.pixels is not None else 1

    @property
    def changed(self) -> bool | None:
        """Whether the model's change mask covers any of it: True for a detected region, False for a given area
        the model sees no change in, None where no mask was measured (a captioner without a change head)."""
        return None if self.objects is None else self.objects > 0


@dataclass(frozen=True)
class GroundedRegion:
    """A region's type, captions and flag: what the regions layer stores besides the facts."""

    change_type: str
    type_confidence: float
    caption: str          # built from type + facts
    model_caption: str    # the decoder's sentence, position words grounded ("" without a decoder)
    caption_flag: str     # why the decoder's sentence contradicts the facts ("" when it does not)


def compass_words(fx: float, fy: float) -> str:
    """Position in the scene from the fractions of its width (west -> east) and height (north -> south)."""
    ns = "north" if fy < 1 / 3 else "south" if fy > 2 / 3 else ""
    ew = "west" if fx < 1 / 3 else "east" if fx > 2 / 3 else ""
    if not ns and not ew:
        return "centre of the scene"
    return f"{ns}{'-' if ns and ew else ''}{ew} part of the scene"


def orientation_words(bearing_deg: float) -> str:
    """A bearing of an axis (degrees clockwise from north, modulo 180) in words, in 45° sectors."""
    b = bearing_deg % 180.0
    return ("north–south", "north-east–south-west", "east–west", "north-west–south-east")[int((b + 22.5) // 45) % 4]


def region_facts(geom, area_m2: float, scene: Bounds, pixels: PixelFacts | None = None) -> RegionFacts:
    """Facts of a region polygon (in a projected or the grid's CRS) inside the scene's bounds (same CRS)."""
    perimeter = geom.length
    compactness = 4 * math.pi * geom.area / perimeter ** 2 if perimeter > 0 else 0.0
    xs, ys = _rotated_rectangle(geom)
    sides = [(math.hypot(xs[i + 1] - xs[i], ys[i + 1] - ys[i]), xs[i + 1] - xs[i], ys[i + 1] - ys[i])
             for i in range(min(2, len(xs) - 1))]
    sides.sort()
    elongation = sides[-1][0] / sides[0][0] if len(sides) == 2 and sides[0][0] > 0 else float("inf")
    bearing = math.degrees(math.atan2(sides[-1][1], sides[-1][2])) % 180.0 if sides else 0.0
    c = geom.centroid
    w, h = max(scene[2] - scene[0], 1e-9), max(scene[3] - scene[1], 1e-9)
    fx, fy = (c.x - scene[0]) / w, (scene[3] - c.y) / h
    return RegionFacts(float(area_m2), float(compactness), float(elongation), compass_words(fx, fy),
                       round(bearing, 1), float(fx), float(fy), pixels)


def _rotated_rectangle(geom) -> tuple[list[float], list[float]]:
    """The corners (xs, ys) of ``geom``'s minimum rotated rectangle, the very floats shapely 1.8's
    ``minimum_rotated_rectangle`` gives ([0, 0], [0, 0] when the convex hull is a point or a line).

    Shapely turns the whole hull once per hull edge in Python, which cost more than the rest of a region's facts;
    here every edge's turned hull is one numpy product, with the same operations in the same order (and the
    envelope's area as GEOS computes it), so the same edge wins and the same corners come out.
    """
    hull = geom.convex_hull
    if hull.geom_type != "Polygon":
        return [0, 0], [0, 0]
    pts = hull.exterior.coords[:]
    units = []
    for (x1, y1), (x2, y2) in zip(pts, pts[1:]):
        dx, dy = x2 - x1, y2 - y1
        length = math.sqrt(dx ** 2 + dy ** 2)
        units.append((dx / length, dy / length))
    u = np.array(units)
    ux, uy = u[:, :1], u[:, 1:]
    x, y = np.array(pts).T
    tx = ux * x + uy * y + 0.0    # the hull turned onto each edge (rows): shapely's affine_transform with
    ty = -uy * x + ux * y + 0.0   # (ux, uy, vx, vy, 0, 0), v = (-uy, ux)
    x0, x1, y0, y1 = tx.min(axis=1), tx.max(axis=1), ty.min(axis=1), ty.max(axis=1)
    k = int(np.argmin((x1 - x0) * (y1 - y0)))  # the first smallest envelope, as Python's min() picks it
    a, b = units[k]
    vx, vy = -b, a
    corners = [(float(x0[k]), float(y0[k])), (float(x1[k]), float(y0[k])), (float(x1[k]), float(y1[k])),
               (float(x0[k]), float(y1[k])), (float(x0[k]), float(y0[k]))]
    return [a * cx + vx * cy + 0 for cx, cy in corners], [b * cx + vy * cy + 0 for cx, cy in corners]


class PixelMeter:
    """Accumulates :class:`PixelFacts` over one region read in bands of rows, so a region as large as the scene
    costs the memory of a band; objects are labelled on a mask thinned to at most ``max_label_pixels``."""

    def __init__(self, height: int, width: int, max_label_pixels: int = 2**22):
        self.stride = max(1, math.ceil(math.sqrt(height * width / max_label_pixels)))
        self._mask = np.zeros((-(-height // self.stride), -(-width // self.stride)), bool)
        self._sums = np.zeros(6)
        self._n = 0
        self._ring = np.zeros(6)
        self._ring_n = 0
        self._index = "ExG"
        self._masked = False  # a change mask was given (the model can detect)
        self._any = False     # ... and some of it lies inside the region

    def add(self, row: int, before: np.ndarray, after: np.ndarray, inside: np.ndarray,
            change: np.ndarray | None = None, ring: np.ndarray | None = None) -> None:
        """A band starting ``row`` rows into the region's window: (bands, h, w) pixels on a 0..255 scale, the
        region's valid pixels, the unsmoothed change mask (prob >= threshold) and the unchanged valid pixels
        around the region (its background)."""
        if change is not None:
            self._masked = True
            self._any = self._any or bool((change & inside).any())
            first = (-row) % self.stride
            thin = (change & inside)[first::self.stride, ::self.stride]
            r0 = (row + first) // self.stride
            self._mask[r0:r0 + thin.shape[0], :thin.shape[1]] |= thin
        n = int(inside.sum())
        n_ring = int(ring.sum()) if ring is not None else 0
        if n == 0 and n_ring == 0:
            return
        for k, img in enumerate((before, after)):
            measures = _pixel_measures(img)
            if img.shape[0] >= 4:
                self._index = "NDVI"
            self._sums[3 * k:3 * k + 3] += [m[inside].sum(dtype=np.float64) for m in measures]
            if n_ring:
                self._ring[3 * k:3 * k + 3] += [m[ring].sum(dtype=np.float64) for m in measures]
        self._n += n
        self._ring_n += n_ring

    def facts(self) -> PixelFacts | None:
        """The region's pixel facts; None when no valid pixel was seen."""
        if self._n == 0:
            return None
        m = self._sums / self._n
        labels, n = ndimage.label(self._mask, structure=np.ones((3, 3), bool))
        if n:
            sizes = np.bincount(labels.ravel())[1:]
            n = int((sizes >= max(2, 0.02 * self._mask.sum())).sum())
        back = (self._ring[3:] - self._ring[:3]) / self._ring_n if self._ring_n >= MIN_BACKGROUND else np.zeros(3)
        objects = (max(1, n) if self._any else 0) if self._masked else None
        return PixelFacts(*(round(float(v), 4) for v in (m[0], m[3], m[1], m[4], m[2], m[5])), objects=objects,
                          greenness_index=self._index, background_brightness_change=round(float(back[0]), 4),
                          background_greenness_change=round(float(back[1]), 4),
                          background_texture_change=round(float(back[2]), 4))


def _pixel_measures(img: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per pixel: brightness (0..1), greenness (chromatic excess green, or NDVI with a 4th band) and texture
    (gradient magnitude of the brightness, per pixel)."""
    rgb = img[:3].astype(np.float32) / 255.0 if img.shape[0] >= 3 else np.repeat(img[:1] / 255.0, 3, axis=0)
    bright = rgb.mean(axis=0)
    if img.shape[0] >= 4:  # R, G, B, NIR: the usual order of 4-band imagery
        nir, red = img[3].astype(np.float32), img[0].astype(np.float32)
        green = (nir - red) / np.maximum(nir + red, 1e-6)
    else:
        total = np.maximum(rgb.sum(axis=0), 1e-6)
        green = (2 * rgb[1] - rgb[0] - rgb[2]) / total
    if min(bright.shape) >= 2:
        gy, gx = np.gradient(bright)
        texture = np.hypot(gx, gy)
    else:
        texture = np.zeros_like(bright)
    return bright, green, texture


def measure_pixels(before: np.ndarray, after: np.ndarray, inside: np.ndarray,
                   change: np.ndarray | None = None, ring: np.ndarray | None = None) -> PixelFacts | None:
    """Pixel facts of one region from arrays in memory: (bands, h, w) before/after pixels on a 0..255 scale, the
    region's valid pixels, the unsmoothed change mask and the unchanged pixels around the region (all (h, w)
    bool)."""
    meter = PixelMeter(*inside.shape)
    meter.add(0, before, after, inside, change, ring)
    return meter.facts()


def measure_window(pair: "AlignedPair", geom) -> Window:
    """The part of the pair's grid a region's facts are read over: its bounds and a margin of the ground around it
    (half its size, at least 4 and at most :data:`BACKGROUND_MARGIN` px), inside the grid."""
    from rasterio.windows import Window, from_bounds

    win = from_bounds(*geom.bounds, transform=pair.grid.transform)
    win = win.round_offsets(op="floor").round_lengths(op="ceil")
    margin = int(min(BACKGROUND_MARGIN, max(4, max(win.width, win.height) // 2)))
    return Window(win.col_off - margin, win.row_off - margin, win.width + 2 * margin,
                  win.height + 2 * margin).intersection(Window(0, 0, pair.width, pair.height))


def measure_regions(pair: "AlignedPair", prob_path: str | os.PathLike | None, geoms: Iterable, threshold: float,
                    band_pixels: int = 2**20) -> list[PixelFacts | None]:
    """Pixel facts of regions (polygons in the grid's CRS): the aligned pair (:class:`.raster_pair.AlignedPair`)
    and the model's probability raster are read over each region's :func:`measure_window`, many small windows in
    one block (:func:`.regions.region_blocks`) and a large one in bands of rows, so memory stays that of a band.

    The probability raster is a run's (the whole grid) or covers at least the windows of the regions given (an
    area's own, :func:`.captioning.caption_areas`). Without one (a captioner that cannot detect) no mask is
    measured: ``objects`` is None and all valid ground around the region is its background."""
    import rasterio
    from rasterio.windows import Window

    from .regions import region_blocks

    geoms = list(geoms)
    windows = [measure_window(pair, geom) for geom in geoms]
    out: list[PixelFacts | None] = [None] * len(geoms)
    meters: dict[int, PixelMeter] = {}
    with (rasterio.open(prob_path) if prob_path is not None else contextlib.nullcontext()) as prob_src:
        # where the probability raster starts on the grid (0, 0 for a whole run's)
        dx, dy = ((int(round(v)) for v in ~pair.grid.transform * (prob_src.transform.c, prob_src.transform.f))
                  if prob_src is not None else (0, 0))
        for block, parts in region_blocks(geoms, windows, pair.grid.transform, band_pixels):
            before, after, valid = pair.read(block)
            prob = (prob_src.read(1, window=Window(block.col_off - dx, block.row_off - dy, block.width,
                                                   block.height)) if prob_src is not None else None)
            for part in parts:
                i, at = part.index, (part.rows, part.cols)
                meter = meters.setdefault(i, PixelMeter(int(windows[i].height), int(windows[i].width)))
                b, a, v, region = before[(slice(None), *at)], after[(slice(None), *at)], valid[at], part.inside
                if prob is None:
                    meter.add(part.row, b, a, region & v, None, v & ~region)
                else:
                    p = prob[at]
                    change = p >= threshold
                    meter.add(part.row, b, a, region & v, change, v & ~region & ~change & (p >= 0))
                if part.last:
                    out[i] = meters.pop(i).facts()
    return out


def is_no_change(caption: str) -> bool:
    return bool(_NO_CHANGE.search(caption.lower()))


def area_words(area_m2: float) -> str:
    """An area as people say it: m² (rounded to tens above 100 m²) below a hectare, ha above."""
    if area_m2 >= 1e4:
        return f"{area_m2 / 1e4:.1f} ha"
    return f"{int(round(area_m2, -1 if area_m2 >= 100 else 0))} m²"


def decoder_type(caption: str) -> str | None:
    """The change type the decoder's own class words name, or None (no class word, or a no-change sentence)."""
    low = (caption or "").lower()
    if not low or is_no_change(low):
        return None
    gone = bool(_GONE_WORDS.search(low))
    new = bool(_NEW_WORDS.search(low))
    kind = _main_kind(low)
    if kind is None:
        return None
    if kind == "building":
        return BUILDING_REMOVED if gone and _first(_GONE_WORDS, low) < _first(_NEW_WORDS, low) else NEW_BUILDING
    if kind == "road":
        return NEW_ROAD
    if kind == "vegetation":
        return VEG_LOST if gone else VEG_GAINED if new else None
    if kind == "water":
        return WATER
    return BARE_SOIL


def _main_kind(low: str) -> str | None:
    """The first class of thing a sentence names (LEVIR-CC sentences name the main change first): building, road,
    vegetation, water, soil, or None."""
    hits = [(m.start(), kind) for kind, rx in (("building", _COMPACT_WORDS), ("road", _LINEAR_WORDS),
                                               ("vegetation", _VEG_WORDS), ("water", _WATER_WORDS),
                                               ("soil", _SOIL_WORDS)) for m in [rx.search(low)] if m]
    return min(hits)[1] if hits else None


def _first(rx: re.Pattern, text: str) -> int:
    m = rx.search(text)
    return m.start() if m else len(text)


def _evidence(facts: RegionFacts) -> dict[str, float]:
    """How well each type fits the facts, 0..1 (0: the facts contradict it). Without pixel facts only the shape
    speaks."""
    shape = facts.shape
    p = facts.pixels
    score = dict.fromkeys(CHANGE_TYPES, 0.0)
    score[OTHER] = 0.3
    if p is None:
        score[NEW_ROAD] = 0.5 if shape != "compact" else 0.0
        score[NEW_BUILDING] = score[BUILDING_REMOVED] = 0.4 if shape != "linear" else 0.0
        score[VEG_LOST] = score[VEG_GAINED] = score[BARE_SOIL] = score[WATER] = 0.3
        return score
    dg, db, dt = p.d_greenness, p.d_brightness, p.d_texture
    greener, browner = dg >= GREEN_STEP, dg <= -GREEN_STEP
    brighter, darker = db >= BRIGHT_STEP, db <= -BRIGHT_STEP
    rougher, smoother = dt >= TEXTURE_STEP, dt <= -TEXTURE_STEP
    vegetated_before, vegetated_after = p.greenness_before >= VEGETATED, p.greenness_after >= VEGETATED
    # vegetation lost: green cover before, much less after (trees cut: the ground shows, brighter)
    if browner and vegetated_before:
        score[VEG_LOST] = min(1.0, 0.6 + 2 * (-dg - GREEN_STEP) + (0.1 if brighter else 0.0))
        if shape != "compact" and smoother and p.greenness_before < WOODED:
            score[VEG_LOST] -= 0.15  # a strip of grass that got smoother: as likely a road through the green
        if shape == "compact" and p.texture_before < SMOOTH:
            score[VEG_LOST] -= 0.2  # smooth green (grass, not canopy) gone under a compact footprint: a roof?
    if greener and vegetated_after:
        score[VEG_GAINED] = min(1.0, 0.6 + 2 * (dg - GREEN_STEP) + (0.1 if darker else 0.0))
    dark_smooth = [b < DARK and t < SMOOTH for b, t in ((p.brightness_before, p.texture_before),
                                                          (p.brightness_after, p.texture_after))]
    if (dark_smooth[1] and darker or dark_smooth[0] and brighter) and not (greener and vegetated_after):
        score[WATER] = 0.6 if shape != "linear" else 0.45
    if not greener:
        # a building appears: a roof on a compact or elongated footprint, over ground that was not woodland
        built = 0.6 + (0.1 if browner else 0) + (0.05 if rougher or brighter else 0)
        score[NEW_BUILDING] = built * (1.0 if shape == "compact" else 0.75 if shape == "elongated" else 0.0)
        # a road appears: long and thin, smoother (or brighter) than what was there
        road = 0.6 + (0.1 if smoother else 0) + (0.1 if brighter else 0) + (0.05 if browner else 0)
        score[NEW_ROAD] = road * (1.0 if shape == "linear" else 0.85 if shape == "elongated" else 0.0)
        # earthworks: ground loses its cover and gets brighter and smoother, on a large or irregular patch
        if (browner or brighter) and smoother and not vegetated_after:
            score[BARE_SOIL] = 0.55 if shape == "compact" else 0.5
    # removed or damaged buildings: a compact footprint whose roof gives way to ground (greener, or rubble with
    # other edges); less likely where green cover went (though a storm strips trees and houses together)
    if shape != "linear":
        gone = 0.55 + (0.1 if greener and not vegetated_after else 0) + (0.05 if rougher or smoother else 0)
        gone -= 0.2 if browner else 0.0
        score[BUILDING_REMOVED] = gone * (1.0 if shape == "compact" else 0.8)
    return score


def classify_change(facts: RegionFacts, caption: str = "") -> tuple[str, float, str]:
    """(change type, confidence 0..1, reason the decoder's type was not used or "") for a region.

    The facts score every type; the decoder's class words, when they name a type the facts allow, add to it. A
    type the facts contradict (score 0) is never used, whatever the decoder says. Without a type at
    :data:`CONFIDENT` the region is an "other change".
    """
    score = _evidence(facts)
    said = decoder_type(caption)
    reason = ""
    if said is not None:
        if score[said] > 0:
            score[said] = min(1.0, score[said] + 0.3)
        else:
            reason = f"says {said} but {_why_not(said, facts)}"
    kind = max(CHANGE_TYPES, key=lambda t: (score[t], -CHANGE_TYPES.index(t)))
    ranked = sorted(score.values(), reverse=True)
    confidence = score[kind] * (0.6 + 0.4 * min(1.0, (ranked[0] - ranked[1]) / 0.2))
    if confidence < CONFIDENT:
        return OTHER, round(confidence, 2), reason
    return kind, round(confidence, 2), reason


def _why_not(kind: str, facts: RegionFacts) -> str:
    """Why the facts rule a type out, in words for the flag."""
    p = facts.pixels
    if kind == NEW_ROAD and facts.shape == "compact":
        return "the region is compact"
    if kind in (NEW_BUILDING, BUILDING_REMOVED) and facts.shape == "linear":
        return "the region is a long thin strip"
    if p is None:
        return "the facts do not support it"
    dg = _greenness_words(p)
    if kind in (VEG_LOST, VEG_GAINED):
        if abs(p.d_greenness) < GREEN_STEP:
            return f"greenness did not change ({dg})"
        return f"greenness went the other way ({dg})"
    if kind in (NEW_BUILDING, NEW_ROAD) and p.d_greenness >= GREEN_STEP:
        return f"the ground got greener ({dg})"
    if kind == WATER:
        return "the region is neither dark nor smooth on either date"
    return "the facts do not support it"


def _greenness_words(p: PixelFacts) -> str:
    """The region's greenness change in numbers, for a flag: its own and, when any, that of its surroundings."""
    around = (f" beyond the {p.background_greenness_change:+.2f} around it" if p.background_greenness_change
              else "")
    return (f"{p.greenness_index} {p.greenness_before:+.2f} → {p.greenness_after:+.2f}, a change of "
            f"{p.d_greenness:+.2f}{around}")


def _described(kind: str, facts: RegionFacts) -> str:
    """A region's caption from its type and facts."""
    n = facts.objects or 0
    what = kind
    if kind == NO_CHANGE:
        what = "no change detected"
    elif n > 1 and kind in (NEW_BUILDING, BUILDING_REMOVED, NEW_ROAD):
        what = f"{_PLURAL[kind]} ({n} objects)"
    elif n > 1 and kind == OTHER:
        what = f"change ({n} objects)"
    elif kind == OTHER:
        what = "change of unclear kind"
    parts = [what, f"about {area_words(facts.area_m2)}", facts.shape]
    if facts.orientation:
        parts[-1] += f" along {'an' if facts.orientation[0] in 'aeiou' else 'a'} {facts.orientation} line"
    return ", ".join(parts) + f", in the {facts.position}"


def ground_region(caption: str, facts: RegionFacts) -> GroundedRegion:
    """Type, grounded caption, grounded decoder sentence and flag of one region from its decoder caption (may be
    "") and its facts."""
    text = (caption or "").strip()
    model_caption, flag = ground_caption(text, facts)
    if facts.changed is False:  # a given area with no change in the model's mask: no type from its pixels
        kind, confidence = NO_CHANGE, 1.0
    else:
        kind, confidence, reason = classify_change(facts, text)
        flag = flag or reason
    if text and not flag:
        said = decoder_type(text)
        if said is not None and said != kind and kind != OTHER:
            flag = f"says {said}; the facts fit {kind} better"
    return GroundedRegion(kind, confidence, _described(kind, facts), model_caption if text else "", flag)


_NOTHING_THERE = "describes a change but the model's change mask has no pixel in the area"


def ground_caption(caption: str, facts: RegionFacts) -> tuple[str, str]:
    """(the decoder's sentence with its crop-relative position words replaced by the region's position in the
    scene, or "" for no sentence; the reason it contradicts the region's shape or report, or "")."""
    text = (caption or "").strip()
    low = text.lower()
    if not text:
        return "", ""
    reason = ""
    if facts.changed is False:
        reason = "" if is_no_change(low) else _NOTHING_THERE
    elif is_no_change(low):
        # a region the model reported; an area given without a change mask was not reported by anyone
        reason = (f"no-change sentence on a region reported as changed ({area_words(facts.area_m2)})"
                  if facts.changed else "")
    elif _LINEAR_WORDS.search(low) and not _COMPACT_WORDS.search(low) and facts.shape == "compact":
        reason = "names a road or path on a compact region"
    elif _COMPACT_WORDS.search(low) and not _LINEAR_WORDS.search(low) and facts.shape == "linear":
        reason = "names a building on a long thin strip"
    elif _main_kind(low) == "vegetation" and facts.pixels is not None and abs(facts.pixels.d_greenness) < GREEN_STEP:
        reason = f"names vegetation but greenness did not change ({_greenness_words(facts.pixels)})"
    if is_no_change(low):
        return text, reason
    grounded = _POSITION.sub("", text).strip()
    grounded = re.sub(r"\s+(and|,)\s*$", "", grounded)
    return f"{grounded} in the {facts.position}", reason


@dataclass
class _TypeTotal:
    count: int = 0
    area: float = 0.0
    wx: float = 0.0
    wy: float = 0.0
    spots: list = field(default_factory=list)


def scene_paragraph(summary: str, regions: Iterable[tuple[RegionFacts, GroundedRegion]], flagged: int,
                    largest: int = 2) -> str:
    """The scene caption: the mask summary, then totals by type with counts and areas, where each concentrates,
    the largest regions, and how many decoder captions contradict their region's facts."""
    totals: dict[str, _TypeTotal] = {}
    biggest: list[tuple[float, str]] = []
    for facts, g in regions:
        t = totals.setdefault(g.change_type, _TypeTotal())
        t.count += 1
        t.area += facts.area_m2
        t.wx += facts.fx * facts.area_m2
        t.wy += facts.fy * facts.area_m2
        t.spots.append((facts.fx, facts.fy, facts.area_m2))
        biggest.append((facts.area_m2, g.caption))
    if not totals:
        return summary
    ordered = sorted(totals.items(), key=lambda kv: (kv[0] == OTHER, -kv[1].area))
    pieces = []
    for i, (kind, t) in enumerate(ordered[:4]):
        where = _concentration(t)
        label = _PLURAL[kind] if t.count > 1 else kind
        pieces.append(f"{'mostly ' if i == 0 and len(ordered) > 1 and t.area > 0.5 * sum(x.area for _, x in ordered) else ''}"
                      f"{label} ({t.count}, {area_words(t.area)}){', ' + where if where else ''}")
    text = f"{summary}: {'; '.join(pieces)}."
    biggest.sort(key=lambda x: -x[0])
    if biggest:
        text += " Largest: " + "; ".join(c for _, c in biggest[:largest]) + "."
    if flagged:
        text += (f" {flagged} decoder caption{'s' if flagged != 1 else ''} contradict{'s' if flagged == 1 else ''} "
                 "the facts of {} region{} (flagged).".format("its" if flagged == 1 else "their",
                                                              "" if flagged == 1 else "s"))
    return text


def _concentration(t: _TypeTotal) -> str:
    """Where a type's area concentrates: the compass words of its area-weighted centre when its regions lie close
    around it (area-weighted spread under a sixth of the scene), else "spread over the scene" (several regions)."""
    if t.area <= 0:
        return ""
    cx, cy = t.wx / t.area, t.wy / t.area
    spread = math.sqrt(sum(a * ((x - cx) ** 2 + (y - cy) ** 2) for x, y, a in t.spots) / t.area)
    if spread <= 1 / 6:
        return f"concentrated in the {compass_words(cx, cy)}" if t.count > 1 else f"in the {compass_words(cx, cy)}"
    return "spread over the scene" if t.count > 1 else ""


# The regions layer's fields these facts and judgements fill, in order (core.geopackage adds them to the schema).
FACT_FIELDS = {"shape": "str", "compactness": "float", "elongation": "float", "orientation_deg": "float",
               "position": "str", "objects": "int", "brightness_change": "float", "greenness_change": "float",
               "texture_change": "float", "greenness_index": "str", "change_type": "str", "type_confidence": "float",
               "model_caption": "str", "caption_flag": "str"}


def fact_record(facts: RegionFacts) -> dict:
    """The stored attributes of a region's facts (FACT_FIELDS minus the judgements made after captioning)."""
    p = facts.pixels
    return {"shape": facts.shape, "compactness": round(facts.compactness, 3),
            "elongation": round(min(facts.elongation, 1e6), 2), "orientation_deg": facts.orientation_deg,
            "position": facts.position, "objects": facts.objects,
            "brightness_change": round(p.d_brightness, 4) if p else None,
            "greenness_change": round(p.d_greenness, 4) if p else None,
            "texture_change": round(p.d_texture, 4) if p else None,
            "greenness_index": p.greenness_index if p else None}


def facts_columns(facts: list[RegionFacts]) -> dict[str, list]:
    """The stored attributes of a batch of regions' facts, column by column (for a frame's ``assign``)."""
    records = [fact_record(f) for f in facts]
    return {name: [r[name] for r in records] for name in (records[0] if records else {})}


def judgement_record(g: GroundedRegion) -> dict:
    """The stored attributes of a region's type, captions and flag."""
    return {"change_type": g.change_type, "type_confidence": g.type_confidence, "caption": g.caption,
            "model_caption": g.model_caption, "caption_flag": g.caption_flag}
