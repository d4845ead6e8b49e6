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
