"""Region captions that cannot contradict the mask.

A caption decoder sees a crop, not the region: it may call a compact blob "a road", say "no difference" about a
region the model itself reported, or place the change in "the bottom right corner" of its crop. This module
measures a few facts of each region (size, shape, position in the scene) with shapely and checks the decoder's
sentence against them:

* a no-change sentence on a reported region is replaced;
* a kind of change the region's shape plainly is not (a road on a compact region, a house on a long thin strip)
  is replaced;
* position words, which describe the crop, are replaced by the region's position in the scene.

A replaced sentence becomes a plain factual one ("a compact change of about 240 m² in the north-west of the
scene"): when the captioner is unsure, a true plain sentence beats a fluent wrong one.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

__all__ = ["RegionFacts", "region_facts", "compass_words", "ground_caption", "is_no_change"]

Bounds = tuple[float, float, float, float]

_NO_CHANGE = re.compile(r"\b(no (difference|change)|nothing (has )?changed|(the )?same as before|(seem )?identical|"
                        r"remains? (the same|unchanged)|unchanged)\b")
_LINEAR_WORDS = re.compile(r"\b(roads?|path(way)?s?|streets?|lanes?|crossroads?|highways?|railways?|avenues?|"
                           r"rivers?|bridges?)\b")
_COMPACT_WORDS = re.compile(r"\b(houses?|buildings?|villas?|bungalows?|constructions?|rooms?|apartments?|"
                            r"storage tanks?|tanks?)\b")
# crop-relative position phrases of LEVIR-CC-style captions
_POSITION = re.compile(r"\s*\b(in|at|on|to|near|from|along)\s+the\s+((top|bottom|upper|lower|left|right|middle|"
                       r"center|centre)(\s+(left|right|middle|center|centre))?)(\s+(corner|side|part|edge|half))?"
                       r"(\s+of\s+the\s+(scene|image|picture|area))?\b")


@dataclass(frozen=True)
class RegionFacts:
    """What a region's polygon says: area, shape and where it lies in the scene."""

    area_m2: float
    compactness: float   # 4 pi A / P^2: 1 for a disc, ~0.785 for a square, -> 0 for a thin strip
    elongation: float    # long / short side of the minimum rotated rectangle (1 = as wide as long)
    position: str        # compass words of the centroid in the scene, e.g. "north-west part of the scene"

    @property
    def shape(self) -> str:
        """compact, elongated or linear (thresholds on elongation and compactness)."""
        if self.elongation >= 6 or self.compactness < 0.12:
            return "linear"
        if self.elongation >= 2.5:
            return "elongated"
        return "compact"


def compass_words(fx: float, fy: float) -> str:
    """Position in the scene from the fractions of its width (west -> east) and height (north -> south)."""
    ns = "north" if fy < 1 / 3 else "south" if fy > 2 / 3 else ""
    ew = "west" if fx < 1 / 3 else "east" if fx > 2 / 3 else ""
    if not ns and not ew:
        return "centre of the scene"
    return f"{ns}{'-' if ns and ew else ''}{ew} part of the scene"


def region_facts(geom, area_m2: float, scene: Bounds) -> RegionFacts:
    """Facts of a region polygon (in a projected or the grid's CRS) inside the scene's bounds (same CRS)."""
    perimeter = geom.length
    compactness = 4 * math.pi * geom.area / perimeter ** 2 if perimeter > 0 else 0.0
    rect = geom.minimum_rotated_rectangle
    xs, ys = rect.exterior.coords.xy if rect.geom_type == "Polygon" else ([0, 0], [0, 0])
    sides = sorted(math.hypot(xs[i + 1] - xs[i], ys[i + 1] - ys[i]) for i in range(min(2, len(xs) - 1)))
    elongation = sides[-1] / sides[0] if len(sides) == 2 and sides[0] > 0 else float("inf")
    c = geom.centroid
    w, h = max(scene[2] - scene[0], 1e-9), max(scene[3] - scene[1], 1e-9)
    position = compass_words((c.x - scene[0]) / w, (scene[3] - c.y) / h)
    return RegionFacts(float(area_m2), float(compactness), float(elongation), position)


def is_no_change(caption: str) -> bool:
    return bool(_NO_CHANGE.search(caption.lower()))


def _area_words(area_m2: float) -> str:
    if area_m2 >= 1e4:
        return f"{area_m2 / 1e4:.1f} ha"
    return f"{int(round(area_m2, -1 if area_m2 >= 100 else 0))} m²"


def factual_caption(facts: RegionFacts) -> str:
    """A plain sentence of what the mask says about the region."""
    return f"a {facts.shape} change of about {_area_words(facts.area_m2)} in the {facts.position}"


def ground_caption(caption: str, facts: RegionFacts) -> tuple[str, str]:
    """(caption to show, reason it was replaced or "") for a region's decoder caption."""
    text = (caption or "").strip()
    low = text.lower()
    if not text or is_no_change(low):
        return factual_caption(facts), "no-change sentence on a reported region" if text else "no caption"
    if _LINEAR_WORDS.search(low) and not _COMPACT_WORDS.search(low) and facts.shape == "compact":
        return factual_caption(facts), "names a road or path on a compact region"
    if _COMPACT_WORDS.search(low) and not _LINEAR_WORDS.search(low) and facts.shape == "linear":
        return factual_caption(facts), "names a building on a long thin strip"
    grounded = _POSITION.sub("", text).strip()
    grounded = re.sub(r"\s+(and|,)\s*$", "", grounded)
    return f"{grounded} in the {facts.position}", ""
