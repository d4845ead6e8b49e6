"""A small, self-contained HTML report of one change run: thumbnails and captions.

Three thumbnails (before, after, the change regions drawn over the after image) are read as decimated
overviews (``out_shape``), so even a very large pair costs only a few hundred thousand pixels. They are embedded
as base64 PNG data URIs: the report is one file that can be mailed or attached to a ticket. Every text that
came from a model or a file name is HTML-escaped. The file is written under a temporary name and renamed into
place, so it is either absent or complete.
"""

from __future__ import annotations

import base64
import html
import io
import os
import struct
import zlib
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import rasterio
from rasterio.crs import CRS
from rasterio.enums import Resampling
from rasterio.features import rasterize
from rasterio.transform import from_bounds
from rasterio.vrt import WarpedVRT
from rasterio.warp import transform_bounds
from rasterio.windows import Window
from rasterio.windows import from_bounds as window_from_bounds

from .atomic import atomic_path
from .errors import InputError
from .outputs import OWN_REPORT_MARK, writing
from .raster_pair import data_bands
from .version import VERSION

if TYPE_CHECKING:
    from .pipeline import ChangeResult

Bounds = tuple[float, float, float, float]
OVERLAY_RGB = (255, 0, 0)
MAX_TABLE_ROWS = 1000


def write_report(path: str | os.PathLike, before_path: str | os.PathLike, after_path: str | os.PathLike,
                 result: "ChangeResult", max_side: int = 512, bounds: Bounds | None = None,
                 title: str = "ChangeScribe change report") -> Path:
    """Write the HTML report of ``result`` to ``path`` and return the path.

    ``bounds`` (in the CRS of ``result.regions``, which is the before raster's) limits the thumbnails, e.g. to
    the area of interest of the run; by default they show the footprint both rasters cover.
    """
    path = Path(path)
    crs = _regions_crs(result, before_path)
    grid_bounds, shape = _thumbnail_grid(before_path, after_path, crs, bounds, max_side)
    transform = from_bounds(*grid_bounds, shape[1], shape[0])
    before_rgb, before_valid = read_thumbnail(before_path, crs, grid_bounds, shape)
    after_rgb, after_valid = read_thumbnail(after_path, crs, grid_bounds, shape)
    overlay = draw_regions(after_rgb, result.regions, crs, transform)
    images = [
        ("Before", os.path.basename(str(before_path)), png_data_uri(before_rgb, before_valid)),
        ("After", os.path.basename(str(after_path)), png_data_uri(after_rgb, after_valid)),
        ("Change regions", f"{len(result.regions)} region(s) outlined in red on the after image",
         png_data_uri(overlay, after_valid)),
    ]
    text = render_html(title, result, images)
    return _write_atomic(path, text)


def _regions_crs(result: "ChangeResult", before_path) -> CRS:
    crs = getattr(result.regions, "crs", None)
    if crs is not None:
        return CRS.from_user_input(crs)
    with rasterio.open(before_path) as src:
        return src.crs


def _footprint(path, crs: CRS) -> tuple[Bounds, float]:
    """Bounds of a raster in ``crs`` and its pixel size in those units (approximate across CRSs)."""
    with rasterio.open(path) as src:
        if src.crs is None:
            raise InputError(f"{path} has no CRS; the report cannot place it")
        b = tuple(src.bounds)
        if src.crs == crs:
            return b, abs(src.transform.a)
        tb = transform_bounds(src.crs, crs, *b, densify_pts=21)
        return tb, (tb[2] - tb[0]) / max(src.width, 1)


def _thumbnail_grid(before_path, after_path, crs: CRS, bounds: Bounds | None,
                    max_side: int) -> tuple[Bounds, tuple[int, int]]:
    """The common footprint (cut to ``bounds``) and a (height, width) of at most ``max_side``, never upsampled."""
    (bl, bb, br, bt), res = _footprint(before_path, crs)
    (al, ab, ar, at), _ = _footprint(after_path, crs)
    left, bottom, right, top = max(bl, al), max(bb, ab), min(br, ar), min(bt, at)
    if bounds is not None:
        left, bottom = max(left, bounds[0]), max(bottom, bounds[1])
        right, top = min(right, bounds[2]), min(top, bounds[3])
    if right <= left or top <= bottom:
        raise InputError("the report's area does not overlap both rasters")
    w_native, h_native = (right - left) / res, (top - bottom) / res
    scale = min(1.0, max_side / max(w_native, h_native))
    width = max(1, int(round(w_native * scale)))
    height = max(1, int(round(h_native * scale)))
    return (left, bottom, right, top), (height, width)


def read_thumbnail(path, crs: CRS, bounds: Bounds, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(H, W, 3) uint8 display RGB and an (H, W) validity mask of ``path`` over ``bounds`` in ``crs``.

    Same CRS: a decimated read (GDAL uses the file's overviews). Another CRS: a warped VRT straight onto the
    thumbnail grid. The first three data bands are shown (a single band as grey); non-8-bit data is stretched
    2–98 % over the valid pixels.
    """
    height, width = shape
    with rasterio.open(path) as src:
        bands = data_bands(src)[:3]
        bands = bands if len(bands) == 3 else [bands[0]] * 3
        if src.crs == crs:
            window = window_from_bounds(*bounds, transform=src.transform)
            window = window.intersection(Window(0, 0, src.width, src.height))
            data = src.read(bands, window=window, out_shape=(3, height, width), resampling=Resampling.average)
            valid = src.dataset_mask(window=window, out_shape=(height, width)) > 0
        else:
            transform = from_bounds(*bounds, width, height)
            with WarpedVRT(src, crs=crs, transform=transform, width=width, height=height,
                           resampling=Resampling.average) as vrt:
                data = vrt.read(bands)
                valid = vrt.dataset_mask() > 0
    return to_display(data, valid), valid


def to_display(data: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """(3, H, W) any dtype → (H, W, 3) uint8; 8-bit data is shown as is."""
    if data.dtype == np.uint8:
        return np.ascontiguousarray(np.moveaxis(data, 0, -1))
    out = np.zeros(data.shape, np.uint8)
    for i, band in enumerate(data.astype(np.float64)):
        vals = band[valid & np.isfinite(band)]
        if vals.size == 0:
            continue
        lo, hi = np.percentile(vals, [2, 98])
        hi = hi if hi > lo else lo + 1.0
        out[i] = np.clip((band - lo) / (hi - lo) * 255.0, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(np.moveaxis(out, 0, -1))


def draw_regions(rgb: np.ndarray, regions, crs: CRS, transform, alpha: float = 0.35) -> np.ndarray:
    """The regions over ``rgb``: a light red fill and a red outline (2 px, so it survives decimation).

    ``regions`` is a :class:`~.geopackage.RegionLayer`, burnt a batch at a time so a large result is never
    read whole.
    """
    out = rgb.copy()
    if regions is None or len(regions) == 0:
        return out
    shape = rgb.shape[:2]
    fill = np.zeros(shape, np.uint8)
    edge = np.zeros(shape, np.uint8)
    for batch in regions.batches():
        if batch.crs is not None and CRS.from_user_input(batch.crs) != crs:
            batch = batch.to_crs(crs.to_wkt())
        geoms = [g for g in batch.geometry if g is not None and not g.is_empty]
        if geoms:
            rasterize([(g, 1) for g in geoms], out=fill, transform=transform)
            rasterize([(g.boundary, 1) for g in geoms], out=edge, transform=transform, all_touched=True)
    fill, edge = fill > 0, edge > 0
    thick = edge.copy()
    thick[1:, :] |= edge[:-1, :]
    thick[:, 1:] |= edge[:, :-1]
    red = np.array(OVERLAY_RGB, np.float32)
    out[fill] = ((1 - alpha) * out[fill] + alpha * red).astype(np.uint8)
    out[thick] = red.astype(np.uint8)
    return out


def png_bytes(rgb: np.ndarray, valid: np.ndarray | None = None) -> bytes:
    """PNG of an (H, W, 3) uint8 image; pixels outside ``valid`` become transparent.

    PIL when importable, else matplotlib's ``imsave`` (which itself needs Pillow since matplotlib 3.3), else a
    minimal encoder here (zlib, no filtering): the report never fails for want of an imaging library.
    """
    img = rgb
    if valid is not None and not valid.all():
        img = np.dstack([rgb, np.where(valid, 255, 0).astype(np.uint8)])
    img = np.ascontiguousarray(img, dtype=np.uint8)
    buf = io.BytesIO()
    try:
        from PIL import Image
    except ImportError:
        try:
            from matplotlib import image as mpl_image

            mpl_image.imsave(buf, img, format="png")
        except ImportError:
            return encode_png(img)
    else:
        Image.fromarray(img, "RGBA" if img.shape[2] == 4 else "RGB").save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def encode_png(img: np.ndarray) -> bytes:
    """An 8-bit RGB or RGBA PNG (filter type 0 on every row), from the PNG specification."""
    height, width, channels = img.shape
    color_type = {3: 2, 4: 6}[channels]

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    rows = np.concatenate([np.zeros((height, 1), np.uint8), img.reshape(height, width * channels)], axis=1)
    header = struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows.tobytes(), 6))
            + chunk(b"IEND", b""))


def png_data_uri(rgb: np.ndarray, valid: np.ndarray | None = None) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(rgb, valid)).decode("ascii")


_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.4em; } h2 { font-size: 1.1em; margin-top: 1.5em; }
.scene { font-size: 1.15em; background: #f4f4f4; padding: .6em .9em; border-left: 4px solid #c00; }
.thumbs { display: flex; flex-wrap: wrap; gap: 1em; }
figure { margin: 0; } figure img { max-width: 100%; border: 1px solid #ccc; image-rendering: pixelated; }
figcaption { font-size: .85em; color: #555; }
table { border-collapse: collapse; font-size: .9em; } th, td { border: 1px solid #ccc; padding: .25em .5em; }
td.num { text-align: right; font-variant-numeric: tabular-nums; } .meta { font-size: .85em; color: #555; }
td.flagged, tr.flag td { background: #fff3cd; }
"""


def _num(value, fmt: str) -> str:
    try:
        return format(float(value), fmt)
    except (TypeError, ValueError):
        return ""


def render_html(title: str, result: "ChangeResult", images: list[tuple[str, str, str]]) -> str:
    """The report's HTML; every piece of text is escaped."""
    e = html.escape
    meta = result.metadata or {}
    model = meta.get("model", {}) if isinstance(meta.get("model"), dict) else {}
    created = meta.get("created") or datetime.now(timezone.utc).isoformat(timespec="seconds")
    facts = [
        ("Before", meta.get("before", "")), ("After", meta.get("after", "")),
        ("Model", " ".join(str(v) for v in (model.get("name"), model.get("version")) if v)),
        ("Device", meta.get("device", "")), ("Threshold", meta.get("threshold", "")),
        ("Minimum area", f"{meta['min_area_m2']} m²" if "min_area_m2" in meta else ""),
        ("Created", created), ("ChangeScribe", meta.get("changescribe_version", VERSION)),
    ]
    parts = [
        "<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">', OWN_REPORT_MARK,
        f"<title>{e(title)}</title>", f"<style>{_CSS}</style>", "</head>", "<body>", f"<h1>{e(title)}</h1>",
        f'<p class="scene" id="scene-caption">{e(result.scene_caption or "")}</p>',
    ]
    if result.summary and result.summary != result.scene_caption:
        parts.append(f'<p id="summary">{e(result.summary)}</p>')
    parts.append('<div class="thumbs">')
    for label, note, uri in images:
        parts.append(f'<figure><img src="{uri}" alt="{e(label)}"><figcaption><b>{e(label)}</b>: {e(note)}'
                     "</figcaption></figure>")
    parts.append("</div>")
    parts += _regions_table(result.regions)
    parts.append("<h2>Run</h2>")
    parts.append('<table class="meta">')
    parts += [f"<tr><th>{e(k)}</th><td>{e(str(v))}</td></tr>" for k, v in facts if v not in ("", None)]
    parts.append("</table>")
    if result.alignment is not None:
        parts.append('<ul class="meta">' + "".join(f"<li>{e(line)}</li>" for line in result.alignment.lines())
                     + "</ul>")
    parts += ["</body>", "</html>", ""]
    return "\n".join(parts)


def _regions_table(regions) -> list[str]:
    e = html.escape
    n = 0 if regions is None else len(regions)
    out = [f"<h2>Change regions ({n})</h2>"]
    if n == 0:
        return out + ["<p>No change region.</p>"]
    rows = regions.largest(MAX_TABLE_ROWS)
    cols = set(rows.columns)

    def text(row, name: str) -> str:
        value = row[name] if name in cols else None
        return value if isinstance(value, str) else ""

    out.append("<table id=\"regions\"><thead><tr><th>id</th><th>area (m²)</th><th>mean probability</th>"
               "<th>max probability</th><th>change type</th><th>caption</th><th>decoder caption</th>"
               "</tr></thead><tbody>")
    for i, (_, row) in enumerate(rows.iterrows()):
        rid = row["region_id"] if "region_id" in cols else i + 1
        flag = text(row, "caption_flag")
        kind = text(row, "change_type")
        if kind and "type_confidence" in cols:
            kind += f" ({_num(row['type_confidence'], '.2f')})"
        mark = ' class="flagged"' if flag else ""
        out.append(
            f"<tr><td class=\"num\">{e(str(rid))}</td>"
            f"<td class=\"num\">{_num(row['area_m2'], ',.1f') if 'area_m2' in cols else ''}</td>"
            f"<td class=\"num\">{_num(row['mean_prob'], '.3f') if 'mean_prob' in cols else ''}</td>"
            f"<td class=\"num\">{_num(row['max_prob'], '.3f') if 'max_prob' in cols else ''}</td>"
            f"<td>{e(kind)}</td><td>{e(text(row, 'caption'))}</td>"
            f"<td{mark}>{('⚠ ' if flag else '') + e(text(row, 'model_caption'))}</td></tr>")
    out.append("</tbody></table>")
    if n > MAX_TABLE_ROWS:
        out.append(f"<p>The {MAX_TABLE_ROWS} largest are listed; {n - MAX_TABLE_ROWS} more regions are in the "
                   "GeoPackage.</p>")
    total, flagged = regions.flagged(MAX_TABLE_ROWS) if hasattr(regions, "flagged") else (0, [])
    if total:
        out.append(f"<h2>Flagged decoder captions ({total})</h2>")
        out.append("<p>The decoder's sentence for these regions contradicts what the mask and the pixels say; the "
                   "region's caption above is built from its facts instead.</p>")
        out.append('<table id="flags"><thead><tr><th>id</th><th>why</th><th>decoder caption</th></tr></thead><tbody>')
        out += [f'<tr class="flag"><td class="num">{e(str(rid))}</td><td>{e(flag)}</td><td>{e(said)}</td></tr>'
                for rid, flag, said in flagged]
        out.append("</tbody></table>")
        if total > len(flagged):
            out.append(f"<p>The first {len(flagged)} are listed; {total - len(flagged)} more are flagged in the "
                       "GeoPackage (field caption_flag).</p>")
    return out


def _write_atomic(path: Path, text: str) -> Path:
    with writing("the report", path), atomic_path(path, ".tmp.html") as tmp:
        Path(tmp).write_text(text, encoding="utf-8")
    return path
