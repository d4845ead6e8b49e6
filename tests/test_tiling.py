"""Tiling and blending: a tiled run equals the untiled one for a context-free oracle model."""

from __future__ import annotations

import numpy as np
import pytest
import rasterio

from changescribe.core.inference import PROBABILITY_NODATA, predict_probability
from changescribe.core.raster_pair import AlignedPair
from changescribe.core.tiling import blend_weights, tile_grid, tile_starts
from conftest import OracleModel, block_pair, oracle_probability, write_geotiff


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
