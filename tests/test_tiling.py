"""Tiling and blending: a tiled run equals the untiled one for a context-free oracle model."""

from __future__ import annotations

import numpy as np
import pytest
import rasterio

import torch

from changescribe.core.inference import BLOCK, PROBABILITY_NODATA, predict_probability
from changescribe.core.raster_pair import AlignedPair
from changescribe.core.tiling import blend_weights, column_panels, tile_grid, tile_starts
from conftest import OracleModel, block_pair, oracle_probability, write_geotiff


class TileContextModel(OracleModel):
    """Each pixel's output depends on its whole tile (the tile's mean difference), like a real model's context:
    blending then matters, and a panel that lacked a covering tile would give a different value."""

    def change_probability(self, before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
        diff = (after - before).abs().mean(dim=1)
        return torch.sigmoid((diff - diff.mean(dim=(1, 2), keepdim=True)) / 8.0)


def test_tile_starts_cover_and_end_flush():
    assert tile_starts(100, 256, 32) == [0]
    starts = tile_starts(1000, 256, 32)
    assert starts[0] == 0 and starts[-1] == 1000 - 256
    assert all(b - a <= 256 - 32 for a, b in zip(starts, starts[1:]))
    with pytest.raises(ValueError):
        tile_starts(1000, 256, 256)


def test_blend_weights_are_positive_and_smooth():
    w = blend_weights(64, 16)
    assert w.min() > 0 and w.max() == 1.0
    assert np.all(np.diff(w[:16]) > 0) and np.all(np.diff(w[-16:]) < 0)
    assert np.allclose(w, w[::-1])


@pytest.mark.parametrize("size,tile,overlap,batch", [(300, 64, 16, 4), (300, 96, 0, 3), (257, 64, 31, 7),
                                                     (40, 64, 8, 2)])
def test_tiled_equals_untiled(tmp_path, size, tile, overlap, batch):
    before, after, _ = block_pair(size)
    b = write_geotiff(tmp_path / "b.tif", before)
    a = write_geotiff(tmp_path / "a.tif", after)
    out = tmp_path / "prob.tif"
    with AlignedPair(b, a) as pair:
        stats = predict_probability(pair, OracleModel(tile), out, tile_size=tile, overlap=overlap, batch_size=batch)
    assert stats.tiles == sum(len(r) for r in tile_grid(size, size, tile, overlap))
    with rasterio.open(out) as src:
        got = src.read(1)
        assert src.crs.to_epsg() == 32633 and src.nodata == PROBABILITY_NODATA
    np.testing.assert_allclose(got, oracle_probability(before, after), atol=1e-5)


def test_nodata_is_never_change(tmp_path):
    before, after, _ = block_pair(200)
    after[:, :, :50] = 0
    b = write_geotiff(tmp_path / "b.tif", before)
    a = write_geotiff(tmp_path / "a.tif", after, nodata=0)
    out = tmp_path / "prob.tif"
    with AlignedPair(b, a) as pair:
        predict_probability(pair, OracleModel(64), out, overlap=16)
    with rasterio.open(out) as src:
        prob = src.read(1)
    assert np.all(prob[:, :50] == PROBABILITY_NODATA)
    assert np.all(prob[:, 50:] >= 0)


@pytest.mark.parametrize("width,tile,overlap,max_width", [(1000, 64, 16, 400), (5000, 256, 32, 1024),
                                                          (3000, 100, 70, 300), (700, 256, 0, 256),
                                                          (10240, 256, 32, 8192), (200, 64, 8, 384)])
def test_column_panels_own_every_column_once_and_completely(width, tile, overlap, max_width):
    panels = column_panels(width, tile, overlap, max_width, BLOCK)
    starts = tile_starts(width, tile, overlap)
    tw = min(tile, width)
    assert panels[0].x0 == 0 and panels[-1].x1 == width
    assert all(a.x1 == b.x0 and b.x0 % BLOCK == 0 for a, b in zip(panels, panels[1:]))
    assert sorted(set(c for p in panels for c in p.cols)) == starts
    for p in panels:
        assert p.x0 < p.x1 and p.left <= p.x0 and p.x1 <= p.right
        assert p.right - p.left <= max(max_width, 2 * tw + BLOCK)
        # Every tile that touches an owned column is in the panel: the panel's blend there is the whole blend.
        touching = {s for s in starts if s < p.x1 and s + tw > p.x0}
        assert touching <= set(p.cols)
    if width <= max_width:
        assert len(panels) == 1


@pytest.mark.parametrize("tile,overlap", [(64, 16), (64, 40), (96, 0)])
def test_panels_blend_exactly_like_the_whole_width(tmp_path, tile, overlap):
    before, after, _ = block_pair(1100)
    before, after = before[:, :150], after[:, :150]  # wide and short: several panels, a quick run
    b = write_geotiff(tmp_path / "b.tif", np.ascontiguousarray(before))
    a = write_geotiff(tmp_path / "a.tif", np.ascontiguousarray(after))
    results = {}
    for name, width in (("whole", 10**6), ("panels", 1)):  # 1 is raised to the smallest workable panel
        out = tmp_path / f"{name}.tif"
        with AlignedPair(b, a) as pair:
            stats = predict_probability(pair, TileContextModel(tile), out, tile_size=tile, overlap=overlap,
                                        batch_size=5, panel_width=width)
        with rasterio.open(out) as src:
            results[name] = (src.read(1), stats.tiles)
    assert len(column_panels(1100, tile, overlap, 1, BLOCK)) >= 3
    assert results["panels"][1] > results["whole"][1]  # the shared tile columns ran twice
    assert np.all(results["panels"][0] >= 0)
    np.testing.assert_allclose(results["panels"][0], results["whole"][0], atol=1e-6)
    # The context model is not per-pixel: another tile size changes the result, so the comparison can fail.
    assert not np.allclose(results["whole"][0], oracle_probability(before, after), atol=1e-3)
