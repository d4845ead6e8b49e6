"""Run a change model over an aligned pair, tile by tile, into a probability GeoTIFF on disk.

Reading the next batch of windows overlaps with the model working on the current one (GDAL and torch both
release the GIL), tiles are blended seamlessly (:mod:`.tiling`) and finished rows go to a tiled,
compressed float32 GeoTIFF, so neither the images nor the probability map are ever held whole.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rasterio
import torch
from rasterio.windows import Window

from .device import halving_on_oom
from .model_api import ChangeModel
from .outputs import OWN_RASTER_TAG
from .raster_pair import AlignedPair
from .run_control import RunControl
from .tiling import Panel, StripBlender, Tile, column_panels, iter_batches, tile_grid

log = logging.getLogger(__name__)

PROBABILITY_NODATA = -1.0
BLOCK = 256
# Widest column panel blended at once: bounds the blend accumulators (about 34 MB at 256-pixel tiles) whatever the
# raster's width; a raster wider than this runs one shared tile column per extra panel twice (about 3 %).
PANEL_WIDTH = 8192


@dataclass
class InferenceStats:
    tiles: int
    seconds: float
    model_seconds: float
    batch_size: int
    device: str

    @property
    def tiles_per_second(self) -> float:
        return self.tiles / self.seconds if self.seconds else float("nan")


def probability_profile(pair: AlignedPair, region: Window | None = None) -> dict:
    """GeoTIFF profile of the probability map: same grid as the pair (or the part ``region`` of it), tiled, float32."""
    region = region if region is not None else Window(0, 0, pair.width, pair.height)
    return {"driver": "GTiff", "width": int(region.width), "height": int(region.height), "count": 1,
            "dtype": "float32", "crs": pair.grid.crs,
            "transform": rasterio.windows.transform(region, pair.grid.transform), "nodata": PROBABILITY_NODATA,
            "tiled": True, "blockxsize": BLOCK, "blockysize": BLOCK, "compress": "deflate",
            "predictor": 3, "zlevel": 1, "BIGTIFF": "IF_SAFER"}


def _pad_to(arr: np.ndarray, size: int) -> np.ndarray:
    """Pad (C, h, w) up to (C, size, size) by mirroring, for rasters smaller than a tile."""
    _, h, w = arr.shape
    if h == size and w == size:
        return arr
    mode = "reflect" if h > 1 and w > 1 and size - h < h and size - w < w else "edge"
    return np.pad(arr, ((0, 0), (0, size - h), (0, size - w)), mode=mode)


def _read_batch(pair: AlignedPair, tiles: list[Tile], size: int):
    befores, afters, valids = [], [], []
    for t in tiles:
        b, a, v = pair.read(t.window)
        # No-data pixels carry arbitrary values; grey keeps them from looking like change to the model.
        b[:, ~v] = 127.0
        a[:, ~v] = 127.0
        befores.append(_pad_to(b, size))
        afters.append(_pad_to(a, size))
        valids.append(v)
    return np.stack(befores), np.stack(afters), valids


def _panel_sink(dst: rasterio.io.DatasetWriter, panel: Panel, region: Window):
    """Write a panel's finished rows, only the columns it owns (there its blend is complete) and only the rows of
    ``region`` (the part of the grid the output raster covers), at their place in it."""
    lo, hi = panel.x0 - panel.left, panel.x1 - panel.left
    x_off, y0 = int(region.col_off), int(region.row_off)
    y1 = y0 + int(region.height)

    def sink(row: int, values: np.ndarray, valid: np.ndarray) -> None:
        r0, r1 = max(row, y0), min(row + values.shape[0], y1)
        if r1 <= r0:
            return
        rows = slice(r0 - row, r1 - row)
        owned = np.where(valid[rows, lo:hi], values[rows, lo:hi], PROBABILITY_NODATA).astype(np.float32)
        dst.write(owned[None], window=Window(panel.x0 - x_off, r0 - y0, hi - lo, r1 - r0))

    return sink


def run_model(model: ChangeModel, before: torch.Tensor, after: torch.Tensor) -> np.ndarray:
    """Probability for a batch, split in halves on CUDA out-of-memory (:func:`.device.halving_on_oom`)."""
    return halving_on_oom(lambda b, a: model.change_probability(b, a).float().cpu().numpy(), np.concatenate,
                          before, after, what="tile")


def predict_probability(pair: AlignedPair, model: ChangeModel, out_path: str | Path, tile_size: int | None = None,
                        overlap: int | None = None, batch_size: int = 8,
                        control: RunControl | None = None, panel_width: int = PANEL_WIDTH,
                        region: Window | None = None) -> InferenceStats:
    """Write the blended change-probability map of ``pair`` (or of the part ``region`` of its grid) to
    ``out_path`` (GeoTIFF).

    The raster is run panel by panel (column bands at most ``panel_width`` wide), each top to bottom, so memory
    depends on neither the raster's width nor its height. A ``region`` (a chunk of a distributed run,
    :mod:`.batch`) runs exactly the tiles of the whole grid that reach it, tiles across its edges included, so
    its pixels get the values the whole run gives them and chunks put side by side make the whole map.
    """
    control = control or RunControl()
    tile = int(tile_size or model.input_spec.tile_size)
    ov = int(tile // 8 if overlap is None else overlap)
    region = region if region is not None else Window(0, 0, pair.width, pair.height)
    x0, y0 = int(region.col_off), int(region.row_off)
    x1, y1 = x0 + int(region.width), y0 + int(region.height)
    panels = [p for p in (panel.within(x0, x1) for panel in column_panels(pair.width, tile, ov, panel_width, BLOCK))
              if p is not None]
    # (panel, batch) in run order: batches never straddle a tile-row or a panel.
    work = [(p, batch) for p in panels for row in tile_grid(pair.height, pair.width, tile, ov, p)
            if row[0].row < y1 and row[0].row + row[0].height > y0
            for batch in iter_batches(row, batch_size)]
    n_tiles = sum(len(b) for _, b in work)
    device = model.device
    started = time.perf_counter()
    model_time = 0.0
    done = 0
    with rasterio.open(out_path, "w", **probability_profile(pair, region)) as dst:
        dst.update_tags(**{OWN_RASTER_TAG: "probability"})  # marks it as ours: a later run may replace it
        blender: StripBlender | None = None
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="changescribe-read") as reader:
            pending: Future = reader.submit(_read_batch, pair, work[0][1], tile)
            blender_panel: Panel | None = None
            current_row = -1
            for i, (panel, batch) in enumerate(work):
                control.check()
                b_np, a_np, valids = pending.result()
                if i + 1 < len(work):
                    pending = reader.submit(_read_batch, pair, work[i + 1][1], tile)
                t0 = time.perf_counter()
                before = torch.from_numpy(b_np).to(device, non_blocking=True)
                after = torch.from_numpy(a_np).to(device, non_blocking=True)
                prob = run_model(model, before, after)
                model_time += time.perf_counter() - t0
                if panel is not blender_panel:  # a panel is done: its last rows out, the next one's buffers in
                    if blender is not None:
                        blender.finish()
                    blender = StripBlender(pair.height, panel.right - panel.left, ov, BLOCK, _panel_sink(dst, panel, region),
                                           col_off=panel.left)
                    blender_panel, current_row = panel, -1
                for t, p, v in zip(batch, prob, valids):
                    if t.row != current_row:
                        blender.begin_row(t.row, t.height)
                        current_row = t.row
                    blender.add(t, p[:t.height, :t.width], v)
                done += len(batch)
                control.progress(done / n_tiles, f"tile {done}/{n_tiles}")
        if blender is not None:
            blender.finish()
    seconds = time.perf_counter() - started
    log.info("inference: %d tiles in %.1f s (%.1f tiles/s, model %.0f%% of the time) on %s", n_tiles, seconds,
             n_tiles / max(seconds, 1e-9), 100 * model_time / max(seconds, 1e-9), device)
    return InferenceStats(tiles=n_tiles, seconds=seconds, model_seconds=model_time, batch_size=batch_size,
                          device=str(device))
