"""From a change-probability raster to change-region polygons with per-region statistics.

The probability map is thresholded and cleaned strip by strip (with a halo so morphology is exact across
strips), polygonized with ``rasterio.features.shapes``, and polygons cut by strip seams are merged with
shapely afterwards, so the binary mask of a huge raster is never held whole.
"""

from __future__ import annotations

import logging
from pathlib import Path

import geopandas as gpd
import numpy as np
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

STRIP = 2048
HALO = 4
_STRUCT = ndimage.generate_binary_structure(2, 2)  # 8-connected 3×3


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


def polygonize(prob_path: str | Path, threshold: float = 0.5, cleanup: int = 1,
               control: RunControl | None = None, strip: int = STRIP) -> tuple[list, dict]:
    """Change polygons (in the raster's CRS) of a probability GeoTIFF; also returns its profile."""
    control = control or RunControl()
    final, seam = [], []
    with rasterio.open(prob_path) as src:
        height, width, transform = src.height, src.width, src.transform
        halo = HALO * max(cleanup, 1)
        for top in range(0, height, strip):
            control.check()
            bottom = min(top + strip, height)
            r0, r1 = max(0, top - halo), min(height, bottom + halo)
            prob = src.read(1, window=Window(0, r0, width, r1 - r0))
            mask = change_mask(prob, threshold, cleanup)[top - r0: top - r0 + (bottom - top)]
            if mask.any():
                strip_transform = transform * transform.translation(0, top)
                for geom, _ in shapes(mask.astype(np.uint8), mask=mask, connectivity=8,
                                      transform=strip_transform):
                    poly = shape(geom)
                    # Polygons touching an inner seam may continue in the next strip: merge later.
                    touches = _touches_row(poly, transform, top) if top > 0 else False
                    touches |= _touches_row(poly, transform, bottom) if bottom < height else False
                    (seam if touches else final).append(poly)
            control.progress(bottom / height, "polygonizing")
        profile = src.profile
    if seam:
        merged = unary_union(seam)
        final.extend(getattr(merged, "geoms", [merged]))
    return final, profile


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
    """Mean and max change probability inside each polygon, read window by window."""
    means = np.zeros(len(geoms))
    maxes = np.zeros(len(geoms))
    with rasterio.open(prob_path) as src:
        for i, g in enumerate(geoms):
            win = window_from_bounds(*g.bounds, transform=src.transform)
            win = win.round_offsets(op="floor").round_lengths(op="ceil")
            win = win.intersection(Window(0, 0, src.width, src.height))
            prob = src.read(1, window=win)
            inside = ~geometry_mask([g], out_shape=prob.shape, transform=src.window_transform(win),
                                    all_touched=False)
            vals = prob[inside & (prob >= 0)]
            if vals.size:
                means[i], maxes[i] = float(vals.mean()), float(vals.max())
    return means, maxes


def change_regions(prob_path: str | Path, threshold: float = 0.5, min_area_m2: float = 0.0,
                   cleanup: int = 1, simplify_px: float = 0.5,
                   control: RunControl | None = None) -> gpd.GeoDataFrame:
    """Change regions with region_id, area_m2, mean_prob, max_prob; largest first."""
    control = control or RunControl()
    geoms, profile = polygonize(prob_path, threshold, cleanup, control.stage(0.0, 0.7))
    crs = profile["crs"]
    pixel = abs(profile["transform"].a)
    if simplify_px > 0:
        geoms = [g.simplify(pixel * simplify_px, preserve_topology=True) for g in geoms]
    geoms = [p for g in geoms for p in valid_polygons(g)]
    areas = area_m2(geoms, crs) if geoms else np.zeros(0)
    keep = areas >= min_area_m2
    geoms = [g for g, k in zip(geoms, keep) if k]
    areas = areas[keep]
    order = np.argsort(-areas, kind="stable")
    geoms = [geoms[i] for i in order]
    areas = areas[order]
    control.check()
    means, maxes = region_statistics(prob_path, geoms) if geoms else (np.zeros(0), np.zeros(0))
    control.progress(1.0, f"{len(geoms)} change regions")
    log.info("%d change regions ≥ %.1f m² at threshold %.2f", len(geoms), min_area_m2, threshold)
    return gpd.GeoDataFrame(
        {"region_id": np.arange(1, len(geoms) + 1, dtype=np.int64), "area_m2": np.round(areas, 2),
         "mean_prob": np.round(means, 4), "max_prob": np.round(maxes, 4)},
        geometry=gpd.GeoSeries(geoms, crs=crs), crs=crs)

