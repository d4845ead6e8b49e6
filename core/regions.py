"""From a change-probability raster to change-region polygons with per-region statistics, as a stream.

The probability map is thresholded and cleaned strip by strip (with a halo so morphology is exact across
strips) and polygonized with ``rasterio.features.shapes``. A polygon cut by the seam below its strip stays open
and is merged with the pieces of the next strip; every other polygon is finished and handed on at once, with its
area and statistics. Memory follows one strip and the regions crossing its seam, never the number of regions
nor the raster's size.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import geopandas as gpd
import numpy as np
import pandas as pd
import rasterio
from pyproj import Geod
from rasterio.features import geometry_mask, shapes
from rasterio.windows import Window
from rasterio.windows import from_bounds as window_from_bounds
from scipy import ndimage
from shapely.geometry import GeometryCollection, MultiPolygon, Polygon, shape
from shapely.ops import unary_union
from shapely.validation import make_valid

from .run_control import RunControl

log = logging.getLogger(__name__)

# Pixels polygonized at once (4 MB of probabilities, a few times that in masks): a strip is this many pixels over
# the raster's width, so memory stays the same for wider rasters. Read at call time: tests shrink it.
STRIP_PIXELS = 2**20
MIN_STRIP_ROWS = 64
HALO = 4
_STRUCT = ndimage.generate_binary_structure(2, 2)  # 8-connected 3×3


@dataclass
class StreamCounters:
    """What the streaming polygonizer held in memory: lets a test prove it is bounded by a strip."""

    strips: int = 0
    polygons: int = 0   # finished polygons handed on
    peak_held: int = 0  # most polygons held at once: one strip's pieces plus those of regions still open


def change_mask(prob: np.ndarray, threshold: float, cleanup: int = 1) -> np.ndarray:
    """Threshold, then open/close with a 3×3 element ``cleanup`` times: removes speckle, fills pinholes.

    The mask is edge-padded first so a region touching the raster border is not eroded by it.
    """
    mask = prob >= threshold  # nodata (-1) is never change
    if cleanup > 0:
        p = cleanup + 1
        padded = np.pad(mask, p, mode="edge")
        padded = ndimage.binary_opening(padded, structure=_STRUCT, iterations=cleanup)
        padded = ndimage.binary_closing(padded, structure=_STRUCT, iterations=cleanup)
        mask = padded[p:-p, p:-p] & (prob >= 0)
    return mask


def iter_polygons(prob_path: str | Path, threshold: float = 0.5, cleanup: int = 1,
                  control: RunControl | None = None, strip: int | None = None,
                  counters: StreamCounters | None = None) -> Iterator[list]:
    """Finished change polygons (in the raster's CRS), one list per strip, top to bottom.

    A piece touching the seam below its strip is held, with the pieces it joins across earlier seams, until no
    piece of its group reaches the next strip; the group is then unioned once. Uniting each group once (rather
    than re-uniting a growing region at every seam) keeps a region that spans the raster linear in its size.
    """
    control = control or RunControl()
    counters = counters if counters is not None else StreamCounters()
    with rasterio.open(prob_path) as src:
        height, width, transform = src.height, src.width, src.transform
        strip = strip or strip_rows(width)
        halo = HALO * max(cleanup, 1)
        n_strips = -(-height // strip)
        held: list[_Open] = []  # groups with a piece on the seam above the current strip
        for top in range(0, height, strip):
            control.check()
            bottom = min(top + strip, height)
            r0, r1 = max(0, top - halo), min(height, bottom + halo)
            prob = src.read(1, window=Window(0, r0, width, r1 - r0))
            mask = change_mask(prob, threshold, cleanup)[top - r0: top - r0 + (bottom - top)]
            del prob
            pieces = []
            if mask.any():
                strip_transform = transform * transform.translation(0, top)
                pieces = [shape(g) for g, _ in shapes(mask.astype(np.uint8), mask=mask, connectivity=8,
                                                      transform=strip_transform)]
            del mask
            counters.strips += 1
            counters.peak_held = max(counters.peak_held, len(pieces) + sum(len(g.pieces) for g in held))
            on_top = [top > 0 and _touches_row(p, transform, top) for p in pieces]
            groups = _join(held, [p for p, t in zip(pieces, on_top) if t])
            groups += [_Open([p], [p]) for p, t in zip(pieces, on_top) if not t]
            held, done, last = [], [], bottom >= height
            for group in groups:
                group.frontier = [] if last else [p for p in group.frontier if _touches_row(p, transform, bottom)]
                if group.frontier:
                    held.append(group)
                else:
                    done += _merge(group.pieces)
            counters.polygons += len(done)
            yield done
            control.progress(bottom / height, f"regions: strip {counters.strips}/{n_strips}")


@dataclass
class _Open:
    """The pieces of one region still growing downwards; ``frontier``: those on the current seam."""

    pieces: list
    frontier: list


def _join(held: list[_Open], joining: list) -> list[_Open]:
    """Group the new pieces on a seam with the held groups whose frontier they meet (by union-find).

    Pieces meeting only at a corner are grouped too: the final union keeps them apart, as separate polygons.
    Held groups that meet no new piece come back alone, with an empty frontier: they are finished.
    """
    parent = list(range(len(held) + len(joining)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    frontier = [f for g in held for f in g.frontier]
    owner = [i for i, g in enumerate(held) for _ in g.frontier]
    if frontier and joining:
        fx = np.array([f.bounds for f in frontier])[:, [0, 2]]  # x-extents: all meet the same seam line
        for j, piece in enumerate(joining):
            x0, _, x1, _ = piece.bounds
            for k in np.flatnonzero((fx[:, 0] <= x1) & (fx[:, 1] >= x0)):
                if piece.intersects(frontier[k]):
                    parent[find(len(held) + j)] = find(owner[k])
    groups: dict[int, _Open] = {}
    for i, g in enumerate(held):
        groups.setdefault(find(i), _Open([], [])).pieces.extend(g.pieces)
    for j, piece in enumerate(joining):
        group = groups.setdefault(find(len(held) + j), _Open([], []))
        group.pieces.append(piece)
        group.frontier.append(piece)
    return list(groups.values())


def _merge(pieces: list) -> list:
    """The polygons of a finished group: its pieces unioned across the seams (corner contacts stay apart)."""
    if len(pieces) == 1:
        return pieces
    merged = unary_union(pieces)
    return list(getattr(merged, "geoms", [merged]))


def strip_rows(width: int) -> int:
    """Rows per strip for a raster ``width`` pixels wide: :data:`STRIP_PIXELS` at most, unless very wide."""
    return max(MIN_STRIP_ROWS, STRIP_PIXELS // max(width, 1))


def polygonize(prob_path: str | Path, threshold: float = 0.5, cleanup: int = 1,
               control: RunControl | None = None, strip: int | None = None) -> tuple[list, dict]:
    """All change polygons of a probability GeoTIFF in one list (small rasters), and its profile."""
    polys = [p for batch in iter_polygons(prob_path, threshold, cleanup, control, strip) for p in batch]
    with rasterio.open(prob_path) as src:
        return polys, src.profile


def _touches_row(poly, transform, row: int) -> bool:
    y = (transform * (0, row))[1]
    eps = abs(transform.e) * 1e-3
    minx, miny, maxx, maxy = poly.bounds
    return miny - eps <= y <= maxy + eps


def valid_polygons(geom) -> list[Polygon]:
    """OGC-valid polygons of a geometry: 8-connected pixels touch at corners, which GIS tools reject."""
    if not geom.is_valid:
        geom = make_valid(geom)
    parts = getattr(geom, "geoms", [geom])
    out = []
    for part in parts:
        if isinstance(part, Polygon):
            out.append(part)
        elif isinstance(part, (MultiPolygon, GeometryCollection)):
            out += valid_polygons(part)
    return [p for p in out if not p.is_empty and p.area > 0]


def area_m2(geoms: list, crs: rasterio.crs.CRS) -> np.ndarray:
    """Areas in square metres: planar for projected CRSs, geodesic (WGS84) for geographic ones."""
    if crs.is_geographic:
        geod = Geod(ellps="WGS84")
        return np.array([abs(geod.geometry_area_perimeter(g)[0]) for g in geoms], dtype=np.float64)
    unit = crs.linear_units_factor[1] if crs.linear_units_factor else 1.0
    return np.array([g.area for g in geoms], dtype=np.float64) * unit * unit


def region_statistics(prob_path: str | Path, geoms: list) -> tuple[np.ndarray, np.ndarray]:
    """Mean and max change probability inside each polygon, read window by window.

    A region's window is read in bands of rows of at most :data:`STRIP_PIXELS`, so one huge region (a long road,
    a flooded plain) costs no more memory than a strip.
    """
    means = np.zeros(len(geoms))
    maxes = np.zeros(len(geoms))
    with rasterio.open(prob_path) as src:
        for i, g in enumerate(geoms):
            win = window_from_bounds(*g.bounds, transform=src.transform)
            win = win.round_offsets(op="floor").round_lengths(op="ceil")
            win = win.intersection(Window(0, 0, src.width, src.height))
            col, row, w, h = (int(v) for v in (win.col_off, win.row_off, win.width, win.height))
            band = max(1, STRIP_PIXELS // max(w, 1))
            total, count, peak = 0.0, 0, 0.0
            for r in range(row, row + h, band):
                part = Window(col, r, w, min(band, row + h - r))
                prob = src.read(1, window=part)
                inside = ~geometry_mask([g], out_shape=prob.shape, transform=src.window_transform(part),
                                        all_touched=False)
                vals = prob[inside & (prob >= 0)]
                if vals.size:
                    total += float(vals.sum(dtype=np.float64))
                    peak = max(peak, float(vals.max()))
                    count += vals.size
            if count:
                means[i], maxes[i] = total / count, peak
    return means, maxes


def iter_regions(prob_path: str | Path, threshold: float = 0.5, min_area_m2: float = 0.0, cleanup: int = 1,
                 simplify_px: float = 0.5, control: RunControl | None = None, strip: int | None = None,
                 counters: StreamCounters | None = None) -> Iterator[gpd.GeoDataFrame]:
    """Finished change regions, a frame at a time, as the strips are read.

    Columns region_id, area_m2, mean_prob, max_prob. Ids count from 1 in the order regions are finished: strip
    by strip, and within a strip by the top-left corner of their bounds (north first, then west), so a run
    numbers the same raster the same way every time.
    """
    control = control or RunControl()
    with rasterio.open(prob_path) as src:
        crs, pixel = src.crs, abs(src.transform.a)
    next_id = 1
    for polys in iter_polygons(prob_path, threshold, cleanup, control, strip, counters):
        if simplify_px > 0:
            polys = [g.simplify(pixel * simplify_px, preserve_topology=True) for g in polys]
        geoms = [p for g in polys for p in valid_polygons(g)]
        if not geoms:
            continue
        areas = area_m2(geoms, crs)
        keep = np.flatnonzero(areas >= min_area_m2)
        if not keep.size:
            continue
        bounds = [geoms[i].bounds for i in keep]
        order = sorted(range(len(keep)), key=lambda j: (-bounds[j][3], bounds[j][0], -areas[keep[j]],
                                                        -bounds[j][1], bounds[j][2]))
        geoms = [geoms[keep[j]] for j in order]
        areas = areas[keep[order]]
        means, maxes = region_statistics(prob_path, geoms)
        ids = np.arange(next_id, next_id + len(geoms), dtype=np.int64)
        next_id += len(geoms)
        yield _frame(ids, areas, means, maxes, geoms, crs)
    log.info("%d change regions ≥ %.1f m² at threshold %.2f", next_id - 1, min_area_m2, threshold)


def _frame(ids, areas, means, maxes, geoms: list, crs) -> gpd.GeoDataFrame:
    return gpd.GeoDataFrame(
        {"region_id": np.asarray(ids, dtype=np.int64), "area_m2": np.round(np.asarray(areas, np.float64), 2),
         "mean_prob": np.round(np.asarray(means, np.float64), 4),
         "max_prob": np.round(np.asarray(maxes, np.float64), 4)},
        geometry=gpd.GeoSeries(geoms, crs=crs), crs=crs)


def change_regions(prob_path: str | Path, threshold: float = 0.5, min_area_m2: float = 0.0,
                   cleanup: int = 1, simplify_px: float = 0.5, control: RunControl | None = None,
                   strip: int | None = None) -> gpd.GeoDataFrame:
    """All change regions in one frame (small rasters, tests); the pipeline streams :func:`iter_regions`."""
    frames = list(iter_regions(prob_path, threshold, min_area_m2, cleanup, simplify_px, control, strip))
    if not frames:
        with rasterio.open(prob_path) as src:
            return _frame([], [], [], [], [], src.crs)
    return gpd.GeoDataFrame(pd.concat(frames, ignore_index=True), crs=frames[0].crs)
