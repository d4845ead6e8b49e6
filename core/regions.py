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
from affine import Affine
from rasterio.enums import MergeAlg
from rasterio.features import geometry_mask, rasterize, shapes
from rasterio.windows import Window
from rasterio.windows import from_bounds as window_from_bounds
from rasterio.windows import transform as window_transform
from scipy import ndimage
from shapely.geometry import GeometryCollection, MultiPolygon, Polygon, mapping, shape
from shapely.ops import clip_by_rect, unary_union
from shapely.validation import make_valid

from .run_control import RunControl

log = logging.getLogger(__name__)

# Pixels polygonized at once (4 MB of probabilities, a few times that in masks): a strip is this many pixels over
# the raster's width, so memory stays the same for wider rasters. Read at call time: tests shrink it.
STRIP_PIXELS = 2**20
MIN_STRIP_ROWS = 64
# Most pixels read at once for the windows of many small regions (:func:`region_blocks`): a larger block is split, so
# the blocks stay close to the windows they serve (reads cost the compressed tiles they touch).
BLOCK_PIXELS = 2**18
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
            groups = _join(held, [p for p, t in zip(pieces, on_top) if t], _seam_box(transform, width, top))
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


def _seam_box(transform: Affine, width: int, row: int) -> tuple[float, float, float, float] | None:
    """The band half a pixel above and below the seam at ``row`` (minx, miny, maxx, maxy); None on a rotated grid."""
    if transform.b != 0 or transform.d != 0:
        return None
    y, half = (transform * (0, row))[1], abs(transform.e) / 2
    x0, x1 = sorted((transform.c, transform.c + transform.a * width))
    return x0 - abs(transform.a), y - half, x1 + abs(transform.a), y + half


def _join(held: list[_Open], joining: list, seam: tuple[float, float, float, float] | None = None) -> list[_Open]:
    """Group the new pieces on a seam with the held groups whose frontier they meet (by union-find).

    Pieces meeting only at a corner are grouped too: the final union keeps them apart, as separate polygons.
    Held groups that meet no new piece come back alone, with an empty frontier: they are finished. The pieces lie
    on either side of the seam, so they can only meet on it: they are tested on their parts within half a pixel of
    it (``seam``: that box, :func:`_seam_box`), which keeps the pieces of a region spanning the raster from costing
    their whole outline at each test.
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
        near: dict[int, object] = {}  # frontier pieces cut to the seam, as they are needed
        for j, piece in enumerate(joining):
            x0, _, x1, _ = piece.bounds
            candidates = np.flatnonzero((fx[:, 0] <= x1) & (fx[:, 1] >= x0))
            cut = clip_by_rect(piece, *seam) if seam is not None and len(candidates) else piece
            for k in candidates:
                if k not in near:
                    near[k] = clip_by_rect(frontier[k], *seam) if seam is not None else frontier[k]
                if cut.intersects(near[k]):
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
    """Mean and max change probability inside each polygon (pixel centres inside it), read block by block.

    The regions' windows are read as :func:`region_blocks` of at most :data:`STRIP_PIXELS`; a region larger than
    that is read in bands of rows, so one huge region (a long road, a flooded plain) costs no more memory than a
    strip.
    """
    total, count, peak = [0.0] * len(geoms), [0] * len(geoms), [0.0] * len(geoms)
    with rasterio.open(prob_path) as src:
        windows = [pixel_window(g, src.transform, src.width, src.height) for g in geoms]
        for block, parts in region_blocks(geoms, windows, src.transform, STRIP_PIXELS):
            prob = src.read(1, window=block)
            for part in parts:
                sub = prob[part.rows, part.cols]
                vals = sub[part.inside & (sub >= 0)]
                if vals.size:
                    i = part.index
                    total[i] += float(vals.sum(dtype=np.float64))
                    peak[i] = max(peak[i], float(vals.max()))
                    count[i] += vals.size
    means = np.array([t / n if n else 0.0 for t, n in zip(total, count)], dtype=np.float64)
    maxes = np.array([p if n else 0.0 for p, n in zip(peak, count)], dtype=np.float64)
    return means, maxes


def pixel_window(geom, transform: Affine, width: int, height: int) -> Window:
    """The window a polygon's pixels are read over: its bounds (offsets rounded down, lengths up) inside the grid."""
    win = window_from_bounds(*geom.bounds, transform=transform)
    win = win.round_offsets(op="floor").round_lengths(op="ceil")
    return win.intersection(Window(0, 0, width, height))


@dataclass(frozen=True)
class RegionPart:
    """A region's pixels in one block of :func:`region_blocks`: rows ``row``... of the region's window, at
    ``rows, cols`` of the block; ``inside`` says which pixel centres lie in the region (what ``geometry_mask`` gives
    the region alone); ``last``: the region's last part."""

    index: int
    row: int
    rows: slice
    cols: slice
    inside: np.ndarray
    last: bool


def region_blocks(geoms: list, windows: list[Window], transform: Affine,
                  band_pixels: int) -> Iterator[tuple[Window, list[RegionPart]]]:
    """The regions' windows on a grid, in blocks of at most ``band_pixels``: (block, the parts of regions in it),
    for the caller to read each block once and measure each region on its slice.

    Reading and rasterizing each region's window alone cost about a millisecond of GDAL calls per region, which
    made the per-region statistics of a run with thousands of small regions cost more than its model. Windows of at
    most ``band_pixels`` are gathered into blocks of nearby windows (:func:`_pack`, at most :data:`BLOCK_PIXELS`
    unless one window is larger) and their regions rasterized in one call (a label image); a region whose pixels may
    overlap another's gets its own mask, so every region sees exactly the pixels it would alone. A larger window is
    a block of its own, read in bands of rows of at most ``band_pixels``, so memory stays that of a band however
    large a region is.
    """
    sizes = [int(w.width) * int(w.height) for w in windows]
    boxes = {i: (int(w.row_off), int(w.row_off + w.height), int(w.col_off), int(w.col_off + w.width))
             for i, w in enumerate(windows) if 0 < sizes[i] <= band_pixels}
    for members in _pack(sorted(boxes), boxes, min(band_pixels, BLOCK_PIXELS)) if boxes else ():
        yield _block(geoms, windows, transform, members, _union([boxes[i] for i in members]))
    for i in (i for i, n in enumerate(sizes) if n > band_pixels):
        col, row, w, h = (int(v) for v in (windows[i].col_off, windows[i].row_off, windows[i].width,
                                           windows[i].height))
        polygons = _rings(geoms[i], transform)  # read once for all its bands
        band = max(1, band_pixels // w)
        for r in range(row, row + h, band):
            part = Window(col, r, w, min(band, row + h - r))
            shape_r = _band_shape(polygons, r - 1, r + int(part.height) + 1)
            inside = (np.zeros((int(part.height), w), bool) if shape_r is None else
                      ~geometry_mask([shape_r], out_shape=(int(part.height), w),
                                     transform=window_transform(part, transform)))
            yield part, [RegionPart(i, r - row, slice(None), slice(None), inside, r + band >= row + h)]


def _union(boxes: list[tuple[int, int, int, int]]) -> tuple[int, int, int, int]:
    """The (row0, row1, col0, col1) box around boxes."""
    r0, r1, c0, c1 = zip(*boxes)
    return min(r0), max(r1), min(c0), max(c1)


def _pack(members: list[int], boxes: dict[int, tuple[int, int, int, int]], limit: int) -> Iterator[list[int]]:
    """Groups of windows (row0, row1, col0, col1) whose union is at most ``limit`` pixels: the group is halved
    across its longer side, at the median of the windows' centres, until it fits (a k-d split), so the blocks
    read stay close to the windows they serve."""
    r0, r1, c0, c1 = _union([boxes[i] for i in members])
    if len(members) == 1 or (r1 - r0) * (c1 - c0) <= limit:
        yield members
        return
    axis = 0 if r1 - r0 >= c1 - c0 else 2
    ordered = sorted(members, key=lambda i: (boxes[i][axis] + boxes[i][axis + 1], i))
    half = len(ordered) // 2
    yield from _pack(ordered[:half], boxes, limit)
    yield from _pack(ordered[half:], boxes, limit)


def _block(geoms: list, windows: list[Window], transform: Affine, members: list[int],
           box: tuple[int, int, int, int]) -> tuple[Window, list[RegionPart]]:
    """One block of :func:`region_blocks`: its members rasterized as a label image (value k + 1: the k-th member)."""
    r0, r1, c0, c1 = box
    block = Window(c0, r0, c1 - c0, r1 - r0)
    block_transform = window_transform(block, transform)
    shape_ = (r1 - r0, c1 - c0)
    labels = rasterize([(geoms[i], k + 1) for k, i in enumerate(members)], out_shape=shape_,
                       transform=block_transform, fill=0, dtype="uint32")
    # Pixels of two regions (a corner after simplification, a given area's parts) take the label drawn last: a
    # region whose pixel extent meets another's gets its own mask where the two really overlap.
    extents = np.array([_pixel_extent(geoms[i].bounds, ~block_transform) for i in members])
    meets = _meeting(extents)
    overlap = None
    if meets.any():
        overlap = rasterize([(geoms[members[k]], 1) for k in np.flatnonzero(meets)], out_shape=shape_,
                            transform=block_transform, fill=0, dtype="uint16", merge_alg=MergeAlg.add) > 1
    parts = []
    for k, i in enumerate(members):
        w = windows[i]
        rows = slice(int(w.row_off) - r0, int(w.row_off + w.height) - r0)
        cols = slice(int(w.col_off) - c0, int(w.col_off + w.width) - c0)
        er0, er1, ec0, ec1 = (int(np.clip(v, 0, n)) for v, n in zip(extents[k], (shape_[0],) * 2 + (shape_[1],) * 2))
        if overlap is not None and meets[k] and overlap[er0:er1, ec0:ec1].any():
            inside = ~geometry_mask([geoms[i]], out_shape=(int(w.height), int(w.width)),
                                    transform=window_transform(w, transform))
        else:
            inside = labels[rows, cols] == k + 1
        parts.append(RegionPart(i, 0, rows, cols, inside, True))
    return block, parts


@dataclass
class _Ring:
    """A polygon ring on the grid: coordinates (n, 2), their rows, the rows it spans, and as GeoJSON."""

    xy: np.ndarray
    rows: np.ndarray
    top: float
    bottom: float
    geojson: tuple


def _rings(geom, transform: Affine) -> list[list[_Ring]]:
    """Each polygon of ``geom`` as its rings (exterior first)."""
    inv = ~transform
    gj = mapping(geom)
    out = []
    for poly in (gj["coordinates"] if gj["type"] == "MultiPolygon" else [gj["coordinates"]]):
        rings = []
        for ring in poly:
            xy = np.asarray(ring, dtype=np.float64)[:, :2]
            rows = inv.d * xy[:, 0] + inv.e * xy[:, 1] + inv.f
            rings.append(_Ring(xy, rows, float(rows.min()), float(rows.max()), ring))
        out.append(rings)
    return out


def _band_shape(polygons: list[list[_Ring]], lo: float, hi: float) -> dict | None:
    """A polygon reduced to the edges that reach rows ``lo``..``hi`` (GeoJSON), None when none does.

    GDAL fills a polygon row by row between the crossings of the row's pixel centres with its edges, looping over
    every edge for every row, so a region with 10⁵ edges cost 10⁵ per row of each band. The edges that cross a row
    of the band are kept exactly; the runs of them are joined by straight segments between points that all lie
    above (or all below) the band, as the edges they replace did, so no row of the band crosses them: the band's
    pixels are those of the whole polygon, at the cost of its own edges.
    """
    out = []
    for rings in polygons:
        if rings[0].bottom < lo or rings[0].top > hi:  # the exterior does not reach the band: nothing of it does
            continue
        kept = []
        for ring in rings:
            if ring.bottom < lo or ring.top > hi:
                continue
            if lo <= ring.top and ring.bottom <= hi:
                kept.append(ring.geojson)
                continue
            y0, y1 = ring.rows[:-1], ring.rows[1:]
            keep = (np.minimum(y0, y1) <= hi) & (np.maximum(y0, y1) >= lo)
            n = len(keep)
            order = (np.arange(n) + int(np.argmin(keep)) + 1) % n  # edges after a dropped one, cyclically
            on = keep[order]
            starts = on & ~np.roll(on, 1)  # the first edge of each run: its start point is kept too
            edges = order[on]
            pick = np.stack([edges, edges + 1], axis=1)[np.stack([starts[on], np.ones(len(edges), bool)], axis=1)]
            kept.append(np.vstack([ring.xy[pick], ring.xy[pick[:1]]]).tolist())
        out.append(kept)
    return {"type": "MultiPolygon", "coordinates": out} if out else None


def _pixel_extent(bounds: tuple[float, float, float, float], inverse: Affine) -> tuple[int, int, int, int]:
    """(row0, row1, col0, col1): pixels any of whose centres could lie in the bounds (rounded outwards)."""
    xs, ys = zip(*(inverse * (x, y) for x in bounds[::2] for y in bounds[1::2]))
    return (int(np.floor(min(ys))), int(np.ceil(max(ys))), int(np.floor(min(xs))), int(np.ceil(max(xs))))


def _meeting(extents: np.ndarray, chunk: int = 512) -> np.ndarray:
    """For each (row0, row1, col0, col1) extent, whether it shares a pixel with another one."""
    out = np.zeros(len(extents), bool)
    for s in range(0, len(extents), chunk):
        e = extents[s:s + chunk, None, :]
        hit = ((e[..., 0] < extents[None, :, 1]) & (extents[None, :, 0] < e[..., 1]) &
               (e[..., 2] < extents[None, :, 3]) & (extents[None, :, 2] < e[..., 3]))
        hit[np.arange(len(e)), np.arange(s, s + len(e))] = False
        out[s:s + chunk] = hit.any(axis=1)
    return out


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
