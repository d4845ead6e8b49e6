"""Putting the after raster onto the before grid: reprojection, clipping, resampling, 16-bit, nodata."""

from __future__ import annotations

import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin
from rasterio.warp import Resampling, calculate_default_transform, reproject
from rasterio.windows import Window

from changescribe.core.errors import InputError
from changescribe.core.raster_pair import AlignedPair
from conftest import write_geotiff


def smooth_image(h: int, w: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.stack([60 + 120 * xx / w, 60 + 120 * yy / h, 100 + 50 * np.sin(xx / 40.0) * np.cos(yy / 50.0)])
    return img.clip(0, 255).astype(np.uint8)


def to_other_crs(src_path, dst_path, crs: str) -> None:
    with rasterio.open(src_path) as src:
        transform, width, height = calculate_default_transform(src.crs, crs, src.width, src.height, *src.bounds)
        profile = src.profile | {"crs": crs, "transform": transform, "width": width, "height": height}
        with rasterio.open(dst_path, "w", **profile) as dst:
            for i in range(1, src.count + 1):
                reproject(rasterio.band(src, i), rasterio.band(dst, i), resampling=Resampling.bilinear)


def test_after_in_another_crs_is_reprojected_onto_before_grid(tmp_path):
    img = smooth_image(400, 400)
    b = write_geotiff(tmp_path / "before.tif", img)
    a_utm = write_geotiff(tmp_path / "after_utm.tif", img)
    a = tmp_path / "after_4326.tif"
    to_other_crs(a_utm, a, "EPSG:4326")
    with AlignedPair(b, a) as pair:
        assert pair.report.after_reprojected and pair.report.after_resampled
        assert not pair.report.before_resampled
        assert pair.grid.crs.to_epsg() == 32633
        assert pair.report.output_res == pytest.approx((0.5, 0.5))
        assert any("EPSG:4326" in n for n in pair.report.notes)
        before, after, valid = pair.read(Window(20, 20, pair.width - 40, pair.height - 40))
    assert valid.mean() > 0.95
    diff = np.abs(before - after)[:, valid]
    assert diff.mean() < 2.0, diff.mean()


def test_partial_overlap_is_clipped_and_offset_read_directly(tmp_path):
    img = smooth_image(300, 300)
    b = write_geotiff(tmp_path / "b.tif", img)
    # after covers the right/bottom part, shifted by exactly 100 px: same lattice, no warp needed
    a = write_geotiff(tmp_path / "a.tif", img[:, 100:, 100:].copy(),
                      transform=from_origin(500000.0 + 50.0, 5000000.0 - 50.0, 0.5, 0.5))
    with AlignedPair(b, a) as pair:
        assert (pair.width, pair.height) == (200, 200)
        assert pair.report.clipped and not pair.report.after_resampled
        before, after, valid = pair.read(Window(0, 0, 200, 200))
    assert valid.all()
    np.testing.assert_array_equal(before, img[:, 100:, 100:].astype(np.float32))
    np.testing.assert_array_equal(after, img[:, 100:, 100:].astype(np.float32))


def test_target_gsd_resamples_both(tmp_path):
    img = smooth_image(400, 400)
    b = write_geotiff(tmp_path / "b.tif", img)
    a = write_geotiff(tmp_path / "a.tif", img)
    with AlignedPair(b, a, target_gsd=1.0) as pair:
        assert (pair.width, pair.height) == (200, 200)
        assert pair.report.before_resampled and pair.report.after_resampled
        assert pair.report.output_res == pytest.approx((1.0, 1.0))


def test_sixteen_bit_is_stretched_to_byte_range(tmp_path):
    img = (smooth_image(200, 200).astype(np.uint16) * 40 + 500)
    b = write_geotiff(tmp_path / "b.tif", img)
    a = write_geotiff(tmp_path / "a.tif", img)
    with AlignedPair(b, a) as pair:
        before, _, _ = pair.read(Window(0, 0, 200, 200))
    assert before.min() >= 0 and before.max() <= 255 and before.max() - before.min() > 200


def test_alpha_and_extra_bands(tmp_path):
    img = smooth_image(100, 100)
    four = np.concatenate([img, np.full((1, 100, 100), 255, np.uint8)])
    four[3, :, :30] = 0
    b = write_geotiff(tmp_path / "b.tif", img)
    a = tmp_path / "a.tif"
    with rasterio.open(a, "w", driver="GTiff", width=100, height=100, count=4, dtype="uint8", crs="EPSG:32633",
                       transform=from_origin(500000.0, 5000000.0, 0.5, 0.5), photometric="RGB",
                       alpha="YES") as ds:
        ds.write(four)
    with AlignedPair(b, a) as pair:
        _, after, valid = pair.read(Window(0, 0, 100, 100))
    assert after.shape[0] == 3
    assert not valid[:, :30].any() and valid[:, 30:].all()


def test_no_overlap_is_refused(tmp_path):
    img = smooth_image(50, 50)
    b = write_geotiff(tmp_path / "b.tif", img)
    a = write_geotiff(tmp_path / "a.tif", img, transform=from_origin(600000.0, 5000000.0, 0.5, 0.5))
    with pytest.raises(InputError, match="do not overlap"):
        AlignedPair(b, a)


@pytest.mark.parametrize("driver,ext", [("COG", "tif"), ("VRT", "vrt"), ("JP2OpenJPEG", "jp2"), ("PNG", "png")])
def test_any_gdal_format_reads_the_same_pixels(tmp_path, driver, ext):
    from rasterio.shutil import copy as gdal_copy

    if driver not in rasterio.drivers.raster_driver_extensions().values() and driver != "COG":
        pytest.skip(f"GDAL here has no {driver} driver")
    img = smooth_image(128, 128)
    b = write_geotiff(tmp_path / "b.tif", img)
    other = tmp_path / f"a.{ext}"
    options = {"QUALITY": 100, "REVERSIBLE": "YES"} if driver == "JP2OpenJPEG" else {}
    gdal_copy(b, other, driver=driver, **options)  # PNG keeps its georeferencing in an .aux.xml sidecar
    with AlignedPair(b, other) as pair:
        assert not pair.report.after_resampled
        before, after, valid = pair.read(Window(0, 0, 128, 128))
    assert valid.all()
    np.testing.assert_array_equal(before, after)


def test_huge_overlap_is_refused_with_advice(tmp_path):
    img = smooth_image(64, 64)
    b = write_geotiff(tmp_path / "b.tif", img)
    with pytest.raises(InputError, match="over the limit.*area of interest"):
        AlignedPair(b, b, max_pixels=1000)
