"""Tile layout and seamless blending of overlapping tile predictions.

Models see fixed-size tiles; their outputs are worst near tile borders (less context), so overlapping
tiles are blended with weights that fall smoothly to near zero at the border. The blend is streamed
strip by strip: only about two tile-rows of accumulators are ever in memory, and finished rows go
straight to the output raster in whole GeoTIFF blocks.
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


def tile_grid(height: int, width: int, tile: int, overlap: int) -> list[list[Tile]]:
    """Tiles grouped by tile-row, in the order the strip blender consumes them."""
    th, tw = min(tile, height), min(tile, width)
    rows = tile_starts(height, tile, overlap)
    cols = tile_starts(width, tile, overlap)
    return [[Tile(r, c, th, tw) for c in cols] for r in rows]


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
    them). ``sink(row_off, values, valid)`` receives finished rows; ``values`` is the blended prediction
    (h, width) and ``valid`` where any tile had valid data.
    """

    def __init__(self, height: int, width: int, overlap: int, block: int,
                 sink: Callable[[int, np.ndarray, np.ndarray], None]):
        self.height, self.width, self.block = height, width, block
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
        r = tile.row - self.start
        self.acc[r:r + h, tile.col:tile.col + w] += values * weight
        self.wsum[r:r + h, tile.col:tile.col + w] += weight

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
