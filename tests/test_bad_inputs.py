"""Bad input gets a clear one-line error, a non-zero exit code, and leaves nothing written."""

from __future__ import annotations

import pickle
import subprocess
import sys

import numpy as np
import pytest
from rasterio.transform import from_origin

from changescribe.core.cli import main
from conftest import write_geotiff


@pytest.fixture
def good_pair(tmp_path):
    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, size=(3, 64, 64)).astype(np.uint8)
    return write_geotiff(tmp_path / "before.tif", img), write_geotiff(tmp_path / "after.tif", img)


def run_cli(capsys, *args) -> tuple[int, str]:
    code = main(list(map(str, args)))
    return code, capsys.readouterr().err


def assert_nothing_written(folder, before_files):
    assert sorted(p.name for p in folder.iterdir()) == sorted(before_files)


def case_files(tmp_path, good_pair, case):
    before, after = good_pair
    img = np.zeros((3, 64, 64), np.uint8)
    if case == "missing":
        return before, tmp_path / "nope.tif", "after raster not found"
    if case == "corrupt":
        bad = tmp_path / "corrupt.tif"
        bad.write_bytes(b"II*\x00this is not really a tiff" * 10)
        return before, bad, "cannot be read"
    if case == "no_crs":
        return write_geotiff(tmp_path / "nocrs.tif", img, crs=None), after, "no coordinate reference system"
    if case == "no_overlap":
        far = write_geotiff(tmp_path / "far.tif", img, transform=from_origin(700000.0, 5000000.0, 0.5, 0.5))
        return before, far, "do not overlap"
    if case == "one_band":
        return before, write_geotiff(tmp_path / "gray.tif", img[:1].copy()), "has 1 band(s) but the model needs 3"
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["missing", "corrupt", "no_crs", "no_overlap", "one_band"])
def test_bad_rasters(tmp_path, good_pair, capsys, case):
    before, after, message = case_files(tmp_path, good_pair, case)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    code, err = run_cli(capsys, "detect", before, after, "-o", out_dir / "result.gpkg", "-q")
    assert code == 2
    assert message in err and err.count("\n") == 1 and err.startswith("changescribe: error:")
    assert_nothing_written(out_dir, [])


def test_unknown_model_name(tmp_path, good_pair, capsys):
    code, err = run_cli(capsys, "detect", *good_pair, "-o", tmp_path / "r.gpkg", "--model", "no-such-model", "-q")
    assert code == 2 and "no-such-model" in err and err.count("\n") == 1
    assert not (tmp_path / "r.gpkg").exists()


def test_pickled_model_file_is_refused(tmp_path, good_pair, capsys):
    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps({"weights": [1, 2, 3]}))
    code, err = run_cli(capsys, "detect", *good_pair, "-o", tmp_path / "r.gpkg", "--model", evil, "-q")
    assert code == 2 and "pickle" in err.lower() and err.count("\n") == 1
    assert not (tmp_path / "r.gpkg").exists()


def test_output_must_be_geopackage(tmp_path, good_pair, capsys):
    code, err = run_cli(capsys, "detect", *good_pair, "-o", tmp_path / "r.shp", "-q")
    assert code == 2 and ".gpkg" in err


def test_console_script_exit_code(tmp_path, good_pair):
    proc = subprocess.run([sys.executable, "-m", "changescribe", "detect", str(good_pair[0]),
                           str(tmp_path / "missing.tif"), "-o", str(tmp_path / "r.gpkg"), "-q"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"changescribe: error: after raster not found: {tmp_path / 'missing.tif'}"]
