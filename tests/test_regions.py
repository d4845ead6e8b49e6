"""Polygonizing the probability map: strips merge seamlessly, areas are in m², stats are right."""

from __future__ import annotations

import numpy as np
import pytest
import rasterio
from rasterio.features import rasterize
from rasterio.transform import from_origin

from changescribe.core.regions import area_m2, change_regions, polygonize
from conftest import write_geotiff


def prob_raster(tmp_path, prob: np.ndarray, crs="EPSG:32633", res=0.5):
    path = tmp_path / "prob.tif"
    transform = from_origin(500000.0, 5000000.0, res, res) if crs != "EPSG:4326" else from_origin(10.0, 45.0, res, res)
    write_geotiff(path, prob[None].astype(np.float32), crs=crs, transform=transform, nodata=-1.0)
    return path


def test_strips_give_the_same_polygons_as_one_pass(tmp_path):
    rng = np.random.default_rng(1)
    prob = np.zeros((300, 200), np.float32)
    for _ in range(25):
        r, c = rng.integers(0, 280, size=1)[0], rng.integers(0, 180, size=1)[0]
        prob[r:r + rng.integers(3, 40), c:c + rng.integers(3, 30)] = 0.9
    path = prob_raster(tmp_path, prob)
    whole, profile = polygonize(path, 0.5, cleanup=1, strip=10_000)
    strips, _ = polygonize(path, 0.5, cleanup=1, strip=32)

    def burn(geoms):
        return rasterize([(g, 1) for g in geoms], out_shape=prob.shape, transform=profile["transform"])

    np.testing.assert_array_equal(burn(whole), burn(strips))
    assert len(strips) == len(whole)


def test_regions_attributes_area_and_statistics(tmp_path):
    prob = np.zeros((100, 100), np.float32)
    prob[10:30, 10:50] = 0.8   # 20 × 40 px at 0.5 m = 200 m²
    prob[20:25, 20:25] = 1.0
    prob[70:72, 70:72] = 0.9   # 1 m²: removed by the opening and by min_area
    prob[90:, :] = -1.0        # nodata
    regions = change_regions(prob_raster(tmp_path, prob), threshold=0.5, min_area_m2=5.0)
    assert list(regions.columns[:4]) == ["region_id", "area_m2", "mean_prob", "max_prob"]
    assert len(regions) == 1
    row = regions.iloc[0]
    assert row.area_m2 == pytest.approx(200.0, rel=0.02)
    assert row.max_prob == pytest.approx(1.0)
    assert row.mean_prob == pytest.approx((775 * 0.8 + 25 * 1.0) / 800, abs=0.01)
    assert regions.crs.to_epsg() == 32633


def test_geographic_crs_areas_are_geodesic_square_metres(tmp_path):
    prob = np.zeros((50, 50), np.float32)
    prob[10:30, 10:30] = 0.9
    path = prob_raster(tmp_path, prob, crs="EPSG:4326", res=1e-5)
    regions = change_regions(path, threshold=0.5)
    # 20 px × 1e-5° ≈ 2.2 m north-south and 1.57 m east-west at 45° N
    assert regions.area_m2.iloc[0] == pytest.approx(20e-5 * 111_132 * 20e-5 * 78_847, rel=0.03)


def test_no_change_gives_an_empty_layer(tmp_path):
    regions = change_regions(prob_raster(tmp_path, np.full((64, 64), 0.1, np.float32)), threshold=0.5)
    assert len(regions) == 0 and "area_m2" in regions.columns


def test_area_of_projected_feet_crs():
    from shapely.geometry import box
    from rasterio.crs import CRS

    ft = CRS.from_epsg(2263)  # NAD83 / New York Long Island (ftUS)
    assert area_m2([box(0, 0, 100, 100)], ft)[0] == pytest.approx(10_000 * 0.3048006 ** 2, rel=1e-4)


def test_regions_are_valid_single_polygons_even_for_corner_touching_pixels(tmp_path):
    prob = np.zeros((60, 60), np.float32)
    # a checkerboard of 4×4 blocks touching only at corners, and a ring with a hole
    for r in range(0, 40, 4):
        for c in range(0, 40, 4):
            if (r // 4 + c // 4) % 2 == 0:
                prob[r:r + 4, c:c + 4] = 0.9
    prob[44:58, 44:58] = 0.9
    prob[48:54, 48:54] = 0.0
    regions = change_regions(prob_raster(tmp_path, prob), threshold=0.5, cleanup=0)
    assert len(regions) > 1
    assert regions.geometry.is_valid.all()
    assert (regions.geometry.geom_type == "Polygon").all()
    assert regions.region_id.is_unique


# --- streaming: regions are finished strip by strip, never all held -----------------------------------------


def many_regions(rows: int = 640, cols: int = 96, seed: int = 4) -> np.ndarray:
    """Small separate blocks all the way down, plus shapes that cross several 32-row seams."""
    rng = np.random.default_rng(seed)
    prob = np.zeros((rows, cols), np.float32)
    for top in range(0, rows - 8, 8):  # one block every 8 rows, never touching the next one
        c = int(rng.integers(0, cols - 40))
        prob[top + 1: top + 1 + int(rng.integers(3, 6)), c: c + int(rng.integers(3, 30))] = 0.9
    prob[:, 80:84] = 0.0           # keep the long shapes clear of the blocks
    prob[5:300, 86:90] = 0.8       # a bar across 9 seams
    prob[320:500, 86:88] = 0.7     # a U: two legs across seams, joined at the bottom only
    prob[320:500, 92:94] = 0.7
    prob[500:504, 86:94] = 0.7
    return prob


def test_streamed_regions_equal_the_unstriped_polygonization(tmp_path):
    prob = many_regions()
    path = prob_raster(tmp_path, prob)
    whole = change_regions(path, 0.5, strip=10_000)        # one strip: no seam, nothing to merge
    streamed = change_regions(path, 0.5, strip=32)          # 20 strips
    assert len(whole) > 70 and len(streamed) == len(whole)
    assert list(streamed.region_id) == list(range(1, len(streamed) + 1))
    with rasterio.open(path) as src:
        transform = src.transform

    def burn(frame):
        return rasterize([(g, i) for g, i in zip(frame.geometry, frame.region_id)], out_shape=prob.shape,
                         transform=transform, dtype="int32")

    # The same pixels belong to one region in both, with the same area and statistics.
    a, b = burn(whole), burn(streamed)
    assert np.array_equal(a > 0, b > 0)
    pairs = {(int(x), int(y)) for x, y in zip(a[a > 0], b[a > 0])}
    assert len(pairs) == len(whole) == len({x for x, _ in pairs}) == len({y for _, y in pairs})
    w = whole.set_index("region_id")
    s = streamed.set_index("region_id")
    for x, y in pairs:
        assert s.area_m2[y] == pytest.approx(w.area_m2[x], rel=0.02)
        assert s.mean_prob[y] == pytest.approx(w.mean_prob[x], abs=1e-3)
        assert s.max_prob[y] == w.max_prob[x]
    # and raw polygons, before simplification, are the very same geometries
    raw_whole, _ = polygonize(path, 0.5, strip=10_000)
    raw_strips, _ = polygonize(path, 0.5, strip=32)
    key = lambda g: (round(-g.bounds[3], 6), round(g.bounds[0], 6))  # noqa: E731
    assert all(p.equals(q) for p, q in zip(sorted(raw_whole, key=key), sorted(raw_strips, key=key)))


def test_a_region_across_many_seams_is_one_polygon(tmp_path):
    prob = np.zeros((200, 40), np.float32)
    prob[3:190, 5:9] = 0.9        # a bar across 11 seams of 16 rows
    prob[20:150, 20:23] = 0.9     # a U: two legs, each across seams, meeting only at the bottom
    prob[20:150, 30:33] = 0.9
    prob[147:150, 20:33] = 0.9
    path = prob_raster(tmp_path, prob)
    regions = change_regions(path, 0.5, strip=16, simplify_px=0)
    assert len(regions) == 2
    bar, u = sorted(regions.geometry, key=lambda g: g.bounds[0])  # the bar is the westernmost
    assert bar.geom_type == u.geom_type == "Polygon"
    assert bar.area == pytest.approx(187 * 4 * 0.25) and u.area == pytest.approx((2 * 130 * 3 + 3 * 7) * 0.25)


def test_polygons_held_at_once_are_bounded_by_a_strip_not_the_raster(tmp_path):
    from changescribe.core.regions import StreamCounters, iter_regions

    short, tall = many_regions(rows=320), many_regions(rows=1280)
    counts = []
    for prob in (short, tall):
        counters = StreamCounters()
        frames = list(iter_regions(prob_raster(tmp_path, prob), 0.5, strip=32, counters=counters))
        ids = np.concatenate([f.region_id.to_numpy() for f in frames])
        assert np.array_equal(ids, np.arange(1, len(ids) + 1))  # raster order, numbered as they finish
        assert len(frames) > 1 and max(len(f) for f in frames) <= 8
        counts.append((counters.polygons, counters.peak_held))
    (few, held_few), (many, held_many) = counts
    assert many > 3 * few > 100
    # 32 rows hold at most 4 blocks; the rest are the pieces of the long shapes, held until they end (the bar spans
    # 10 strips). Four times the regions, the same bound:
    assert held_few <= 16 and held_many <= 16


def test_statistics_of_a_region_larger_than_a_strip_are_read_in_bands(tmp_path, monkeypatch):
    import changescribe.core.regions as regions_mod

    rng = np.random.default_rng(2)
    prob = np.where(rng.random((300, 120)) < 0.5, 0.6, 0.95).astype(np.float32)
    prob[:, :10] = 0.0
    prob[100:110, 50:60] = -1.0  # nodata inside the region is not counted
    path = prob_raster(tmp_path, prob)
    geoms, _ = polygonize(path, 0.5, cleanup=0)
    whole = regions_mod.region_statistics(path, geoms)
    monkeypatch.setattr(regions_mod, "STRIP_PIXELS", 7 * 110)  # bands of 7 rows
    banded = regions_mod.region_statistics(path, geoms)
    inside = prob[prob >= 0.5]
    assert whole[0][0] == pytest.approx(inside.mean(), rel=1e-6) and whole[1][0] == pytest.approx(0.95)
    np.testing.assert_allclose(banded, whole, rtol=1e-9)


def test_region_blocks_give_each_region_the_pixels_it_has_alone():
    """Regions read together (small ones in shared blocks, large ones in bands reduced to the edges that reach
    them) see exactly the pixels ``geometry_mask`` gives each alone, overlapping polygons included, and no block
    is larger than asked."""
    from rasterio.features import geometry_mask
    from rasterio.windows import transform as window_transform
    from shapely.affinity import rotate
    from shapely.geometry import MultiPolygon, Point, box

    from changescribe.core.regions import pixel_window, region_blocks

    transform = from_origin(366676.8, 4104256.44, 0.6, 0.67)  # real-world origin and non-square pixels
    width, height = 300, 260

    def at(col, row):
        return transform * (col, row)

    rng = np.random.default_rng(5)
    geoms = [Point(*at(*rng.uniform(5, 250, 2))).buffer(rng.uniform(0.5, 6)) for _ in range(60)]
    geoms += [rotate(box(*at(40, 60), *at(70, 40)), 30), box(*at(55, 60), *at(90, 45))]  # overlapping
    geoms += [MultiPolygon([box(*at(200, 30), *at(220, 10)), box(*at(210, 35), *at(230, 15))])]  # parts overlap
    ring = Point(*at(150, 130)).buffer(70, 64)
    holes = [Point(*at(150 + dx, 130 + dy)).buffer(8) for dx in (-30, 0, 30) for dy in (-30, 0, 30)]
    geoms.append(ring.difference(MultiPolygon(holes)))  # larger than a block: read in bands
    windows = [pixel_window(g, transform, width, height) for g in geoms]
    band_pixels = 40 * 120
    seen = [np.zeros((int(w.height), int(w.width)), np.uint8) for w in windows]
    last = [0] * len(geoms)
    for block, parts in region_blocks(geoms, windows, transform, band_pixels):
        assert block.width * block.height <= band_pixels
        for part in parts:
            rows = part.inside.shape[0]
            seen[part.index][part.row:part.row + rows] += part.inside
            last[part.index] += part.last
    assert any(int(w.width * w.height) > band_pixels for w in windows)
    for g, w, s, n in zip(geoms, windows, seen, last):
        alone = ~geometry_mask([g], out_shape=s.shape, transform=window_transform(w, transform))
        assert n == 1 and s.max() <= 1
        np.testing.assert_array_equal(s.astype(bool), alone)
