"""Open, validate and align a before/after raster pair on one pixel grid, streaming.

The *after* image is put onto the *before* image's grid (CRS, resolution, pixel lattice), optionally
resampled to the GSD a model was trained at, and both are clipped to their common footprint. Nothing is
read up front: :meth:`AlignedPair.read` pulls one window at a time, straight from the file when a source
already sits on the output grid and through a GDAL ``WarpedVRT`` otherwise, so memory does not grow with
the raster.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import rasterio
from rasterio.enums import ColorInterp, MaskFlags, Resampling
from rasterio.errors import RasterioError, RasterioIOError
from rasterio.transform import Affine
from rasterio.vrt import WarpedVRT
from rasterio.warp import transform_bounds
from pyproj import Transformer
from rasterio.features import geometry_mask
from rasterio.windows import Window
from shapely.geometry import box
from shapely.geometry.base import BaseGeometry
from shapely.ops import transform as shapely_transform

from .errors import InputError

log = logging.getLogger(__name__)

# Rows read at once when looking for border fill (bounded memory whatever the width: one strip of all bands).
FILL_SCAN_PIXELS = 2**22

# Rasters larger than this (pixels on the output grid) are refused: a user almost certainly picked the
# wrong layer or GSD, and the run would take days. Overridable per call.
MAX_PIXELS = 40_000 * 40_000


@dataclass(frozen=True)
class Grid:
    """The output pixel grid shared by both images."""

    crs: rasterio.crs.CRS
    transform: Affine
    width: int
    height: int

    @property
    def res(self) -> tuple[float, float]:
        return (abs(self.transform.a), abs(self.transform.e))

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        return rasterio.transform.array_bounds(self.height, self.width, self.transform)


@dataclass
class AlignmentReport:
    """What was done to make the pair comparable, in words a GIS analyst recognises."""

    crs: str
    before_res: tuple[float, float]
    after_res: tuple[float, float]
    output_res: tuple[float, float]
    after_reprojected: bool
    before_resampled: bool
    after_resampled: bool
    clipped: bool
    width: int
    height: int
    overlap_area_m2: float
    notes: list[str] = field(default_factory=list)
    # Inputs that declare no NoData, alpha or mask: their black/white border fill is looked for (fill_nodata).
    undeclared_nodata: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        out = [f"output grid {self.width}×{self.height} px at {_fmt_res(self.output_res)} in {self.crs}"]
        out += self.notes
        return out

    def to_dict(self) -> dict:
        return {"crs": self.crs, "before_res": list(self.before_res), "after_res": list(self.after_res),
                "output_res": list(self.output_res), "after_reprojected": self.after_reprojected,
                "before_resampled": self.before_resampled, "after_resampled": self.after_resampled,
                "clipped": self.clipped, "width": self.width, "height": self.height,
                "overlap_area_m2": self.overlap_area_m2, "notes": self.notes,
                "undeclared_nodata": self.undeclared_nodata}


def _fmt_res(res: tuple[float, float]) -> str:
    x, y = res
    return f"{x:.3g} m" if math.isclose(x, y, rel_tol=1e-3) else f"{x:.3g}×{y:.3g} m"


def open_raster(path: str | os.PathLike, role: str) -> rasterio.DatasetReader:
    """Open with a message that names the role (before/after) and the actual problem."""
    p = str(path)
    if not p.startswith("/vsi") and not Path(p).exists():
        raise InputError(f"{role} raster not found: {p}")
    try:
        ds = rasterio.open(p)
    except RasterioIOError as exc:
        raise InputError(f"{role} raster cannot be read ({p}): {exc}") from None
    try:
        if ds.crs is None:
            raise InputError(f"{role} raster has no coordinate reference system: {p} "
                             "(assign one, e.g. with gdal_edit.py -a_srs, or georeference it in QGIS)")
        if ds.transform == Affine.identity() and not ds.gcps[0]:
            raise InputError(f"{role} raster has no geotransform (not georeferenced): {p}")
        if ds.transform.b != 0 or ds.transform.d != 0:
            raise InputError(f"{role} raster is rotated; warp it to a north-up grid first: {p}")
    except InputError:
        ds.close()
        raise
    return ds


def data_bands(ds: rasterio.DatasetReader) -> list[int]:
    """1-based band indexes that hold image data (alpha bands are masks, not data)."""
    return [i + 1 for i, ci in enumerate(ds.colorinterp) if ci != ColorInterp.alpha]


def _metres_per_unit(crs: rasterio.crs.CRS) -> float:
    if crs.is_geographic:
        return 111_320.0  # rough metres per degree, only for reporting and GSD decisions
    factor = crs.linear_units_factor[1] if crs.linear_units_factor else 1.0
    return float(factor or 1.0)


def unreadable(role: str, path: str, exc: BaseException) -> InputError:
    """A raster that opened but whose pixels cannot be read (truncated file, corrupt compressed tiles)."""
    detail = " ".join(str(exc).split())
    return InputError(f"{role} raster {path} is damaged: its pixels cannot be read ({detail}); "
                      "re-export or re-download it")


def declares_nodata(ds: rasterio.DatasetReader) -> bool:
    """True when the file says where it has no data: a NoData value, an alpha band or a mask band."""
    if ds.nodata is not None or ColorInterp.alpha in ds.colorinterp:
        return True
    return any(MaskFlags.all_valid not in flags for flags in ds.mask_flag_enums)


class BorderFill:
    """Constant black or white fill connected to the grid's border, as runs from each edge.

    Mosaics and warped exports often fill the area outside the image with 0 (or the type's maximum) without
    declaring it as NoData. A pixel is fill when a straight run of fill (or no-data) pixels joins it to the border
    of the grid along its row or its column; a dark patch inside the image is never fill. Only four run lengths
    per row and column are kept, so memory is O(width + height) whatever the raster's size.
    """

    def __init__(self, left: np.ndarray, right: np.ndarray, top: np.ndarray, bottom: np.ndarray):
        self.left, self.right, self.top, self.bottom = left, right, top, bottom
        self.height, self.width = len(left), len(top)

    @classmethod
    def scan(cls, read_raw, width: int, height: int, fill_values: tuple[float, ...]) -> "BorderFill | None":
        """Runs of fill from every edge, reading the source in strips; None when no edge starts with fill."""
        rows = max(1, FILL_SCAN_PIXELS // max(1, width))
        left = np.zeros(height, np.int64)
        right = np.zeros(height, np.int64)
        top = np.zeros(width, np.int64)
        open_top = np.ones(width, bool)
        last_data = np.full(width, -1, np.int64)  # last row per column that is not fill
        for r0 in range(0, height, rows):
            h = min(rows, height - r0)
            data, valid = read_raw(Window(0, r0, width, h))
            fill = ~valid
            for value in fill_values:
                fill |= (data == value).all(axis=0)
            full_rows = fill.all(axis=1)
            left[r0:r0 + h] = np.where(full_rows, width, np.argmin(fill, axis=1))
            right[r0:r0 + h] = np.where(full_rows, width, np.argmin(fill[:, ::-1], axis=1))
            full_cols = fill.all(axis=0)
            top += np.where(open_top, np.where(full_cols, h, np.argmin(fill, axis=0)), 0)
            open_top &= full_cols
            last = h - 1 - np.argmin(fill[::-1], axis=0)
            last_data = np.where(full_cols, last_data, r0 + last)
        bottom = height - 1 - last_data
        if not (left.any() or right.any() or top.any() or bottom.any()):
            return None
        return cls(left, right, top, bottom)

    def mask(self, window: Window) -> np.ndarray:
        """True where ``window`` (on the grid) is border fill."""
        r0, c0 = int(window.row_off), int(window.col_off)
        rows = np.arange(r0, r0 + int(window.height))
        cols = np.arange(c0, c0 + int(window.width))
        r, c = rows[:, None], cols[None, :]
        return ((c < self.left[rows][:, None]) | (c >= self.width - self.right[rows][:, None])
                | (r < self.top[cols][None, :]) | (r >= self.height - self.bottom[cols][None, :]))

    def share(self) -> float:
        """The fraction of the grid that is fill (from the runs; exact for collars and edge strips)."""
        masked = 0
        for r0 in range(0, self.height, 1024):
            masked += int(self.mask(Window(0, r0, self.width, min(1024, self.height - r0))).sum())
        return masked / max(1, self.width * self.height)


class _GridSource:
    """Reads one dataset on the output grid: a direct windowed read where it already lies on it.

    Pixels that are not finite (NaN, ±inf in float rasters) are no data, like masked ones: a NaN must not spread
    through the stretch or the model into the rest of the scene.
    """

    def __init__(self, ds: rasterio.DatasetReader, grid: Grid, bands: list[int], resampling: Resampling,
                 role: str = "input"):
        self.ds = ds
        self.role = role
        self.bands = bands
        self.vrt: WarpedVRT | None = None
        self.fill: BorderFill | None = None
        self.offset = _integer_offset(ds, grid)
        if self.offset is None:
            has_alpha = ColorInterp.alpha in ds.colorinterp
            self.vrt = WarpedVRT(ds, crs=grid.crs, transform=grid.transform, width=grid.width,
                                 height=grid.height, resampling=resampling, add_alpha=not has_alpha)
        try:
            self.scale = _display_scale(ds, bands)
        except (RasterioError, RasterioIOError) as exc:  # IOError is not a RasterioError
            raise unreadable(role, ds.name, exc) from None

    @property
    def warped(self) -> bool:
        return self.vrt is not None

    def find_fill(self, grid: Grid) -> float:
        """Look for black/white border fill (a file without declared no-data); the share of the grid it covers."""
        if declares_nodata(self.ds):
            return 0.0
        dtype = np.dtype(self.ds.dtypes[self.bands[0] - 1])
        values = (0, np.iinfo(dtype).max) if dtype.kind in "ui" else (0,)
        self.fill = BorderFill.scan(self._read_raw, grid.width, grid.height, values)
        return self.fill.share() if self.fill is not None else 0.0

    def read(self, window: Window) -> tuple[np.ndarray, np.ndarray]:
        """Pixels (bands, h, w) as float32 on a 0..255 scale, and a validity mask (h, w) bool."""
        data, valid = self._read_raw(window)
        if self.fill is not None:
            valid &= ~self.fill.mask(window)
        out = data.astype(np.float32)
        if self.scale is not None:
            lo, hi = self.scale
            out = np.clip((out - lo[:, None, None]) * (255.0 / (hi - lo))[:, None, None], 0.0, 255.0)
        return out, valid

    def _read_raw(self, window: Window) -> tuple[np.ndarray, np.ndarray]:
        """The file's own values on the grid (non-finite ones zeroed and masked) and the validity mask."""
        try:
            if self.vrt is not None:
                data = self.vrt.read(self.bands, window=window)
                valid = self.vrt.dataset_mask(window=window) > 0
            else:
                r, c = self.offset
                win = Window(window.col_off + c, window.row_off + r, window.width, window.height)
                data = self.ds.read(self.bands, window=win)
                valid = self.ds.dataset_mask(window=win) > 0
        except (RasterioError, RasterioIOError) as exc:  # IOError is not a RasterioError
            raise unreadable(self.role, self.ds.name, exc) from None
        if data.dtype.kind == "f":
            finite = np.isfinite(data)
            valid &= finite.all(axis=0)
            data = np.where(finite, data, 0)
        return data, valid

    def close(self) -> None:
        if self.vrt is not None:
            self.vrt.close()
        self.ds.close()


def _integer_offset(ds: rasterio.DatasetReader, grid: Grid) -> tuple[int, int] | None:
    """(row, col) of the grid's origin in the dataset when both share CRS, resolution and lattice."""
    if ds.crs != grid.crs:
        return None
    t, g = ds.transform, grid.transform
    if not (math.isclose(t.a, g.a, rel_tol=1e-9) and math.isclose(t.e, g.e, rel_tol=1e-9)):
        return None
    col = (g.c - t.c) / t.a
    row = (g.f - t.f) / t.e
    if abs(col - round(col)) > 1e-6 or abs(row - round(row)) > 1e-6:
        return None
    col, row = int(round(col)), int(round(row))
    if col < 0 or row < 0 or col + grid.width > ds.width or row + grid.height > ds.height:
        return None
    return row, col


def _display_scale(ds: rasterio.DatasetReader, bands: list[int]) -> tuple[np.ndarray, np.ndarray] | None:
    """2–98 % stretch for non-8-bit imagery, from a decimated read: models are trained on 0..255."""
    if all(dt == "uint8" for dt in (ds.dtypes[b - 1] for b in bands)):
        return None
    step = max(1, max(ds.width, ds.height) // 1024)
    shape = (len(bands), max(1, ds.height // step), max(1, ds.width // step))
    sample = ds.read(bands, out_shape=shape, masked=True).astype(np.float64)
    lo = np.empty(len(bands))
    hi = np.empty(len(bands))
    for i in range(len(bands)):
        vals = sample[i].compressed()
        vals = vals[np.isfinite(vals)]  # NaN / inf are no data
        if vals.size == 0:
            lo[i], hi[i] = 0.0, 1.0
            continue
        lo[i], hi[i] = np.percentile(vals, [2, 98])
        if hi[i] <= lo[i]:
            hi[i] = lo[i] + 1.0
    return lo.astype(np.float32), hi.astype(np.float32)


class AlignedPair:
    """Before and after rasters on one grid, clipped to their overlap; read window by window."""

    def __init__(self, before: str | os.PathLike, after: str | os.PathLike, bands: int = 3,
                 band_indexes: list[int] | None = None, target_gsd: float | None = None,
                 max_pixels: int = MAX_PIXELS, area_of_interest: AreaOfInterest | None = None,
                 fill_nodata: bool = True):
        """``fill_nodata``: in a file that declares no NoData, constant black or white fill touching the border
        is no data (:class:`BorderFill`); False reads such files as they are."""
        self.before_path, self.after_path = str(before), str(after)
        b = open_raster(before, "before")
        try:
            a = open_raster(after, "after")
        except InputError:
            b.close()
            raise
        try:
            self.grid, self.report = _plan_grid(b, a, target_gsd)
            self.aoi = None
            if area_of_interest is not None:
                self.grid, self.aoi = _clip_to_aoi(self.grid, area_of_interest, self.report)
            if self.grid.width * self.grid.height > max_pixels:
                raise InputError(
                    f"the overlap is {self.grid.width}×{self.grid.height} px, over the limit of "
                    f"{max_pixels:,} px; clip the inputs to an area of interest or use a coarser GSD")
            b_bands = _pick_bands(b, "before", bands, band_indexes)
            a_bands = _pick_bands(a, "after", bands, band_indexes)
            res_b = _resampling(b, self.grid)
            res_a = _resampling(a, self.grid)
            self._before = _GridSource(b, self.grid, b_bands, res_b, "before")
            self._after = _GridSource(a, self.grid, a_bands, res_a, "after")
        except Exception:
            b.close()
            a.close()
            raise
        self.report.before_resampled = self._before.warped
        self.report.after_resampled = self._after.warped
        if self._before.warped:
            self.report.notes.append(f"before: resampled to {_fmt_res(self.grid.res)} ({res_b.name})")
        if self._after.warped:
            what = "reprojected and resampled" if self.report.after_reprojected else "resampled"
            self.report.notes.append(
                f"after: {what} from {_fmt_res(self.report.after_res)} onto the before grid ({res_a.name})")
        else:
            self.report.notes.append("after: already on the before grid, read directly")
        for role, source in (("before", self._before), ("after", self._after)):
            if not fill_nodata or role not in self.report.undeclared_nodata:
                continue
            share = source.find_fill(self.grid)
            self.report.notes.append(f"{role}: declares no NoData; black/white fill along its border is no data "
                                     f"({100 * share:.1f} % of the grid)")
        if not fill_nodata and self.report.undeclared_nodata:
            self.report.notes.append(f"{' and '.join(self.report.undeclared_nodata)}: declare(s) no NoData; "
                                     "border fill is read as image (fill detection off)")
        for line in self.report.lines():
            log.info(line)

    @property
    def width(self) -> int:
        return self.grid.width

    @property
    def height(self) -> int:
        return self.grid.height

    def read(self, window: Window) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(before, after, valid) for a window of the output grid; valid = both have data."""
        bw, bv = self._before.read(window)
        aw, av = self._after.read(window)
        valid = bv & av
        if self.aoi is not None:
            valid &= ~geometry_mask([self.aoi], out_shape=valid.shape,
                                    transform=rasterio.windows.transform(window, self.grid.transform))
        return bw, aw, valid

    def close(self) -> None:
        self._before.close()
        self._after.close()

    def __enter__(self) -> "AlignedPair":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass(frozen=True)
class AreaOfInterest:
    """Limit a run to a polygon (or an extent's box) given in ``crs``; pixels outside are no data."""

    geometry: BaseGeometry
    crs: str

    @classmethod
    def from_bounds(cls, bounds: tuple[float, float, float, float], crs: str) -> "AreaOfInterest":
        return cls(box(*bounds), crs)


def _clip_to_aoi(grid: Grid, aoi: AreaOfInterest, report: AlignmentReport) -> tuple[Grid, BaseGeometry]:
    """The grid cut to the AOI's bounding box (on the same lattice) and the AOI in the grid's CRS."""
    geom = aoi.geometry
    src = rasterio.crs.CRS.from_user_input(aoi.crs)
    if src != grid.crs:
        geom = shapely_transform(Transformer.from_crs(src, grid.crs, always_xy=True).transform, geom)
    if geom.is_empty or not geom.intersects(box(*grid.bounds)):
        raise InputError("the area of interest does not overlap the two rasters")
    t = grid.transform
    minx, miny, maxx, maxy = geom.bounds
    c0 = max(0, math.floor((minx - t.c) / t.a))
    c1 = min(grid.width, math.ceil((maxx - t.c) / t.a))
    r0 = max(0, math.floor((t.f - maxy) / -t.e))
    r1 = min(grid.height, math.ceil((t.f - miny) / -t.e))
    if c1 <= c0 or r1 <= r0:
        raise InputError("the area of interest is smaller than one pixel")
    clipped = Grid(grid.crs, t * Affine.translation(c0, r0), c1 - c0, r1 - r0)
    report.width, report.height = clipped.width, clipped.height
    unit = _metres_per_unit(grid.crs)
    report.overlap_area_m2 = min(report.overlap_area_m2, geom.intersection(box(*grid.bounds)).area * unit * unit)
    report.clipped = True
    report.notes.append(f"limited to the area of interest: {report.overlap_area_m2 / 1e6:.3f} km²")
    return clipped, geom


def validate_pair(before: str | os.PathLike, after: str | os.PathLike, target_gsd: float | None = None,
                  area_of_interest: AreaOfInterest | None = None) -> AlignmentReport:
    """Open both rasters and plan their common grid (at ``target_gsd``, clipped to ``area_of_interest``) without
    reading pixels; raises :class:`InputError`. The report's width and height are the run's grid."""
    b = open_raster(before, "before")
    try:
        with open_raster(after, "after") as a:
            grid, report = _plan_grid(b, a, target_gsd)
            if area_of_interest is not None:
                _clip_to_aoi(grid, area_of_interest, report)
            return report
    finally:
        b.close()


def _pick_bands(ds: rasterio.DatasetReader, role: str, bands: int, band_indexes: list[int] | None) -> list[int]:
    available = data_bands(ds)
    if band_indexes:
        bad = [i for i in band_indexes if i not in available]
        if bad:
            raise InputError(f"{role} raster has no data band(s) {bad}; it has {available}")
        if len(band_indexes) != bands:
            raise InputError(f"the model needs {bands} bands but {len(band_indexes)} were chosen")
        return list(band_indexes)
    if len(available) < bands:
        raise InputError(f"{role} raster has {len(available)} band(s) but the model needs {bands} "
                         f"({ds.name})")
    return available[:bands]


def _resampling(ds: rasterio.DatasetReader, grid: Grid) -> Resampling:
    """Average when shrinking (anti-aliasing), bilinear otherwise: imagery is continuous."""
    src_res = abs(ds.transform.a) * _metres_per_unit(ds.crs)
    dst_res = grid.res[0] * _metres_per_unit(grid.crs)
    return Resampling.average if dst_res > 1.5 * src_res else Resampling.bilinear


def _plan_grid(b: rasterio.DatasetReader, a: rasterio.DatasetReader,
               target_gsd: float | None) -> tuple[Grid, AlignmentReport]:
    """The before grid (or its GSD-resampled twin) clipped to the footprint both images cover."""
    crs = b.crs
    a_bounds = transform_bounds(a.crs, crs, *a.bounds, densify_pts=21) if a.crs != crs else a.bounds
    left = max(b.bounds.left, a_bounds[0])
    bottom = max(b.bounds.bottom, a_bounds[1])
    right = min(b.bounds.right, a_bounds[2])
    top = min(b.bounds.top, a_bounds[3])
    if right <= left or top <= bottom:
        raise InputError("the before and after rasters do not overlap "
                         f"(before {tuple(round(v, 3) for v in b.bounds)}, after in the same CRS "
                         f"{tuple(round(v, 3) for v in a_bounds)})")
    bres = (abs(b.transform.a), abs(b.transform.e))
    ares = (abs(a.transform.a), abs(a.transform.e))
    unit = _metres_per_unit(crs)
    res = bres
    if target_gsd:
        if crs.is_geographic:
            raise InputError("a target GSD in metres needs a projected CRS for the before raster")
        res = (target_gsd / unit, target_gsd / unit)
    # Snap the overlap onto the lattice of the (possibly resampled) before grid, inward.
    x0, y0 = b.transform.c, b.transform.f
    c0 = math.ceil((left - x0) / res[0] - 1e-6)
    c1 = math.floor((right - x0) / res[0] + 1e-6)
    r0 = math.ceil((y0 - top) / res[1] - 1e-6)
    r1 = math.floor((y0 - bottom) / res[1] + 1e-6)
    width, height = c1 - c0, r1 - r0
    if width < 1 or height < 1:
        raise InputError("the before and after rasters overlap by less than one pixel")
    transform = Affine(res[0], 0, x0 + c0 * res[0], 0, -res[1], y0 - r0 * res[1])
    grid = Grid(crs=crs, transform=transform, width=width, height=height)
    full = (width * res[0] * unit) * (height * res[1] * unit)
    b_pixels = b.width * b.height * (bres[0] * bres[1]) / (res[0] * res[1])
    report = AlignmentReport(
        crs=crs.to_string(), before_res=_metres(bres, unit), after_res=_metres(ares, _metres_per_unit(a.crs)),
        output_res=_metres(res, unit), after_reprojected=a.crs != crs, before_resampled=False,
        after_resampled=False, clipped=width * height < b_pixels - 0.5, width=width, height=height,
        overlap_area_m2=full)
    report.undeclared_nodata = [role for role, ds in (("before", b), ("after", a)) if not declares_nodata(ds)]
    if report.after_reprojected:
        report.notes.append(f"after: {a.crs.to_string()} → {crs.to_string()}")
    if report.clipped:
        report.notes.append(f"clipped to the common footprint: {full / 1e6:.3f} km²")
    return grid, report


def _metres(res: tuple[float, float], unit: float) -> tuple[float, float]:
    return (res[0] * unit, res[1] * unit)
