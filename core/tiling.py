"""Tile layout and seamless blending of overlapping tile predictions.

Models see fixed-size tiles; their outputs are worst near tile borders (less context), so overlapping
tiles are blended with weights that fall smoothly to near zero at the border. The blend is streamed
strip by strip: only about two tile-rows of accumulators are ever in memory, and finished rows go
straight to the output raster in whole GeoTIFF blocks. A wide raster is cut into column panels
(:func:`column_panels`) blended one after the other, so the accumulators are bounded in width too and memory
does not grow with the raster in either direction.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
from rasterio.windows import Window


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets covering [0, length) with the given overlap; the last tile ends flush with the edge."""
    if tile <= 0:
        raise ValueError("tile size must be positive")
    if not 0 <= overlap < tile:
        raise ValueError(f"overlap must be in [0, tile size); got {overlap} for tile {tile}")
    if length <= tile:
        return [0]
    stride = tile - overlap
    starts = list(range(0, length - tile, stride))
    starts.append(length - tile)
    return starts


@dataclass(frozen=True)
class Tile:
    """One tile of the output grid. ``window`` may reach past the raster when it is smaller than a tile."""

    row: int
    col: int
    height: int
    width: int

    @property
    def window(self) -> Window:
        return Window(self.col, self.row, self.width, self.height)


def tile_grid(height: int, width: int, tile: int, overlap: int, panel: "Panel | None" = None) -> list[list[Tile]]:
    """Tiles (of the whole width, or of one panel) grouped by tile-row, in the order the strip blender takes them."""
    th, tw = min(tile, height), min(tile, width)
    rows = tile_starts(height, tile, overlap)
    cols = panel.cols if panel is not None else tile_starts(width, tile, overlap)
    return [[Tile(r, c, th, tw) for c in cols] for r in rows]


@dataclass(frozen=True)
class Panel:
    """A band of tile columns blended on its own.

    Its tiles span columns [``left``, ``right``); it owns (writes) columns [``x0``, ``x1``), where every tile that
    covers a pixel belongs to the panel, so the blend there equals the whole-width blend exactly. Neighbouring
    panels share a tile column or two, which are run twice: the price of width-bounded memory.
    """

    cols: tuple[int, ...]
    x0: int
    x1: int
    tile_width: int

    @property
    def left(self) -> int:
        return self.cols[0]

    @property
    def right(self) -> int:
        return self.cols[-1] + self.tile_width

    def within(self, x0: int, x1: int) -> "Panel | None":
        """The part of this panel that owns columns [``x0``, ``x1``) (a chunk of a distributed run): only the
        tiles that reach those columns, so the blend there is still the whole run's; None if it owns none."""
        lo, hi = max(self.x0, x0), min(self.x1, x1)
        if hi <= lo:
            return None
        return Panel(tuple(c for c in self.cols if c < hi and c + self.tile_width > lo), lo, hi, self.tile_width)


def column_panels(width: int, tile: int, overlap: int, max_width: int, block: int) -> list[Panel]:
    """Tile columns grouped into panels at most ``max_width`` wide whose owned ranges meet at block multiples.

    Owned ranges are cut at multiples of ``block`` so each panel writes whole GeoTIFF blocks. ``max_width`` is
    raised to ``2 * tile + block`` when smaller: below that a panel could own nothing.
    """
    starts = tile_starts(width, tile, overlap)
    tw = min(tile, width)
    max_width = max(max_width, 2 * tw + block)
    panels: list[Panel] = []
    i, x0 = 0, 0
    while True:
        j = i
        while j + 1 < len(starts) and starts[j + 1] + tw - starts[i] <= max_width:
            j += 1
        if j == len(starts) - 1:
            panels.append(Panel(tuple(starts[i:]), x0, width, tw))
            return panels
        cut = (starts[j + 1] // block) * block  # tiles right of the panel start at or after this column
        nxt = next(k for k, s in enumerate(starts) if s + tw > cut)  # first tile that still reaches past the cut
        panels.append(Panel(tuple(starts[i:j + 1]), x0, cut, tw))
        i, x0 = nxt, cut


def blend_weights(size: int, overlap: int) -> np.ndarray:
    """1-D weights: 1 in the middle, a raised-cosine ramp over the overlap, never exactly 0."""
    w = np.ones(size, dtype=np.float64)
    ramp = min(overlap, size // 2)
    if ramp > 0:
        t = (np.arange(ramp) + 0.5) / ramp
        r = 0.5 - 0.5 * np.cos(np.pi * t)
        w[:ramp] = r
        w[size - ramp:] = np.minimum(w[size - ramp:], r[::-1])
    return w


def blend_window(height: int, width: int, overlap: int) -> np.ndarray:
    """2-D separable blending window for a tile."""
    return np.outer(blend_weights(height, overlap), blend_weights(width, overlap)).astype(np.float32)


class StripBlender:
    """Accumulates weighted tile predictions and emits finished rows in block-aligned strips.

    Tiles must arrive tile-row by tile-row with non-decreasing row offsets (as :func:`tile_grid` yields
    them). The accumulators cover columns [``col_off``, ``col_off + width``) (a :class:`Panel`'s tiles).
    ``sink(row_off, values, valid)`` receives finished rows; ``values`` is the blended prediction
    (h, width) and ``valid`` where any tile had valid data.
    """

    def __init__(self, height: int, width: int, overlap: int, block: int,
                 sink: Callable[[int, np.ndarray, np.ndarray], None], col_off: int = 0):
        self.height, self.width, self.block = height, width, block
        self.col_off = col_off
        self.overlap = overlap
        self.sink = sink
        self.start = 0  # first row held in the buffers
        self.acc = np.zeros((0, width), np.float32)
        self.wsum = np.zeros((0, width), np.float32)
        self._weights: dict[tuple[int, int], np.ndarray] = {}

    def _window(self, h: int, w: int) -> np.ndarray:
        key = (h, w)
        if key not in self._weights:
            self._weights[key] = blend_window(h, w, self.overlap)
        return self._weights[key]

    def begin_row(self, row: int, tile_height: int) -> None:
        """Rows above ``row`` can no longer change: flush whole blocks of them, grow to cover the tile."""
        self._flush(upto=row, final=False)
        need = row + tile_height - self.start
        if need > self.acc.shape[0]:
            extra = need - self.acc.shape[0]
            self.acc = np.vstack([self.acc, np.zeros((extra, self.width), np.float32)])
            self.wsum = np.vstack([self.wsum, np.zeros((extra, self.width), np.float32)])

    def add(self, tile: Tile, values: np.ndarray, valid: np.ndarray) -> None:
        """Add one tile's prediction; ``valid`` zeroes the weight where either image had no data."""
        h, w = values.shape
        weight = self._window(h, w) * valid
        r, c = tile.row - self.start, tile.col - self.col_off
        self.acc[r:r + h, c:c + w] += values * weight
        self.wsum[r:r + h, c:c + w] += weight

    def finish(self) -> None:
        self._flush(upto=self.height, final=True)

    def _flush(self, upto: int, final: bool) -> None:
        n = upto - self.start
        if not final:  # ``start`` stays block-aligned, so GeoTIFF blocks are written once, whole
            n = (n // self.block) * self.block
        if n <= 0:
            return
        acc, wsum = self.acc[:n], self.wsum[:n]
        valid = wsum > 0
        out = np.zeros_like(acc)
        np.divide(acc, wsum, out=out, where=valid)
        self.sink(self.start, out, valid)
        self.acc, self.wsum = self.acc[n:].copy(), self.wsum[n:].copy()
        self.start += n


def iter_batches(tiles: list[Tile], batch_size: int) -> Iterator[list[Tile]]:
    """Consecutive slices of a tile-row."""
    for i in range(0, len(tiles), batch_size):
        yield tiles[i:i + batch_size]
