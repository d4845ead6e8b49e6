"""``changescribe batch`` on a real dask LocalCluster (issue 17): chunks of a pair merge exactly into the single run's
regions, the units table and the work folder make a re-run resume, a failing unit is reported without losing the
others, and bad input stops the batch in one line before anything is written.

Real GeoTIFFs, real rasterio/GDAL, SQLite and torch (the shipped `pix4cap-synthetic`, 128 px tiles, so the
640² sample pair is 49 tiles), real worker processes.
"""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import geopandas as gpd
import pytest
import rasterio
from shapely.geometry import box

pytest.importorskip("distributed")

from changescribe.core.api import DetectRequest  # noqa: E402
from changescribe.core.batch import UNITS_TABLE, run_batch, work_folder  # noqa: E402
from changescribe.core.cli import main  # noqa: E402
from changescribe.core.run import run_request  # noqa: E402

MODEL = "pix4cap-synthetic"
pytestmark = pytest.mark.timeout(1800)  # worker processes start slowly on a loaded 2-core machine


def units(gpkg: Path) -> dict[str, dict]:
    con = sqlite3.connect(gpkg)
    con.row_factory = sqlite3.Row
    try:
        return {r["unit"]: dict(r) for r in con.execute(f"SELECT * FROM {UNITS_TABLE}")}  # nosec B608
    finally:
        con.close()


def manifest(path: Path, rows: list[tuple[str, str, str]]) -> Path:
    path.write_text("name,before,after\n" + "".join(f"{n},{b},{a}\n" for n, b, a in rows), encoding="utf-8")
    return path


def crop(src: str, dst: Path, size: int = 256) -> str:
    subprocess.run(["gdal_translate", "-q", "-srcwin", "128", "128", str(size), str(size), src, str(dst)], check=True)
    return str(dst)


def test_chunks_on_two_workers_equal_the_single_run_and_resume(tmp_path, sample):
    """The sample pair (640²) cut into 2×2 chunks (512 px, tiles across the seams run in both chunks) on a LocalCluster of
    2 processes gives the regions of one whole run: same ids, geometry, areas, probabilities and captions."""
    before, after = sample
    single = run_request(DetectRequest(before=before, after=after, model=MODEL, output=str(tmp_path / "single.gpkg")))
    out = tmp_path / "batch.gpkg"
    seen: list[dict] = []
    result = run_batch([str(manifest(tmp_path / "pairs.csv", [("sample", before, after)]))], out, {"model": MODEL},
                       workers=2, chunk_size=512, on_unit=lambda row, done, total: seen.append(row))
    assert result.output == out and not result.failed
    table = units(out)
    assert sorted(r["kind"] for r in table.values()) == ["chunk"] * 4 + ["regions"]
    assert all(r["status"] == "done" and r["resumed"] == 0 for r in table.values())
    assert len(seen) == 5  # the progress callback heard every future
    workers = {r["worker"] for r in table.values()}
    assert len(workers) == 2  # both processes worked, and each loaded the model once, not once per unit
    assert max(r["model_loads"] for r in table.values()) == 1
    assert sum(r["tiles"] for r in table.values() if r["kind"] == "chunk") > single.stats.tiles  # the halo tiles

    ref = single.regions.read().sort_values("region_id", ignore_index=True)
    got = gpd.read_file(out, layer="change_regions").sort_values("region_id", ignore_index=True)
    assert len(ref) > 5 and len(got) == len(ref) and result.regions == len(ref)
    assert (got["pair"] == "sample").all()
    assert list(got["region_id"]) == list(ref["region_id"])
    for g, r in zip(got.geometry, ref.geometry):
        assert g.symmetric_difference(r).area <= 1e-6 * r.area + 1e-9
    for col in ("area_m2", "mean_prob", "max_prob"):
        assert (got[col] - ref[col]).abs().max() <= 1e-3, col
    assert list(got["caption"]) == list(ref["caption"])
    assert list(got["caption_regions"]) == list(ref["caption_regions"])
    assert not list(work_folder(out).glob("*.tif"))  # the chunks went once their pair's regions were written

    again = run_batch([str(tmp_path / "pairs.csv")], out, {"model": MODEL}, workers=2, chunk_size=512)
    assert all(r["resumed"] == 1 for r in units(out).values())  # nothing ran again
    assert again.regions == len(ref)


def test_a_failing_unit_is_reported_and_the_next_run_retries_only_it(tmp_path, sample):
    before, after = sample
    good_b, good_a = crop(before, tmp_path / "b.tif"), crop(after, tmp_path / "a.tif")
    bad = tmp_path / "bad_after.tif"  # opens, but its pixels cannot be read: found only when the unit runs
    subprocess.run(["gdal_translate", "-q", "-co", "TILED=YES", "-co", "BLOCKXSIZE=64", "-co", "BLOCKYSIZE=64",
                    "-co", "COMPRESS=DEFLATE", good_a, str(bad)], check=True)
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size * 2 // 3])
    pairs = manifest(tmp_path / "pairs.csv", [("good", good_b, good_a), ("damaged", good_b, str(bad))])
    out = tmp_path / "out.gpkg"
    args = ["batch", str(pairs), "-o", str(out), "--model", MODEL, "--workers", "1", "--no-captions", "-q"]
    proc = subprocess.run([sys.executable, "-m", "changescribe", *args], capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert "Traceback" not in proc.stderr and lines[-1].startswith("changescribe: error: 1 of 2 units failed")
    assert "damaged" in lines[-1]
    table = units(out)  # the good pair is in, the damaged one is listed with its error
    assert [r["status"] for r in table.values() if r["pair"] == "good"] == ["done"]
    failed = [r for r in table.values() if r["status"] != "done"]
    assert len(failed) == 1 and failed[0]["pair"] == "damaged" and "damaged" in failed[0]["error"]
    first = gpd.read_file(out, layer="change_regions")
    assert set(first["pair"]) <= {"good"}

    shutil.copyfile(good_a, bad)  # the user repairs the file and runs the same command again
    proc = subprocess.run([sys.executable, "-m", "changescribe", *args], capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stderr
    table = units(out)
    assert {r["pair"]: r["resumed"] for r in table.values()} == {"good": 1, "damaged": 0}
    assert all(r["status"] == "done" for r in table.values())


@pytest.mark.parametrize("case, expected", [
    ("no_after_column", "no after path"),
    ("missing_raster", "pair p: "),
    ("not_ours", "was not written by ChangeScribe"),
    ("bad_option", "threshold must be between 0 and 1"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, sample, capsys, case, expected):
    before, after = sample
    out = tmp_path / "out.gpkg"
    rows = [("p", before, after)]
    extra: list[str] = []
    if case == "missing_raster":
        rows = [("p", before, str(tmp_path / "nowhere.tif"))]
    if case == "not_ours":
        out.write_bytes(b"someone else's data")
    if case == "bad_option":
        extra = ["--threshold", "1.5"]
    path = manifest(tmp_path / "pairs.csv", rows)
    if case == "no_after_column":
        path.write_text(f"name,before\np,{before}\n", encoding="utf-8")
    code = main(["batch", str(path), "-o", str(out), "--model", MODEL, "-q", *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("changescribe: error:") and expected in err[0], err
    assert not work_folder(out).exists()
    if case == "not_ours":
        assert out.read_bytes() == b"someone else's data"
    else:
        assert not out.exists()


def test_without_dask_the_batch_says_how_to_install_it(tmp_path, sample):
    before, after = sample
    path = manifest(tmp_path / "pairs.csv", [("p", before, after)])
    code = ("import sys; sys.modules['distributed'] = None; sys.modules['dask.distributed'] = None; "
            "from changescribe.core.cli import main; "
            f"sys.exit(main(['batch', {str(path)!r}, '-o', {str(tmp_path / 'o.gpkg')!r}]))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert "needs dask.distributed" in proc.stderr and "pip install 'dask[distributed]'" in proc.stderr
    assert not (tmp_path / "o.gpkg").exists()


def test_processing_algorithm_runs_the_batch_and_reports_bad_input(qgis_app, tmp_path, sample):
    """`changescribe:detectchangesbatch` runs `changescribe batch` in this Python (a local cluster of one worker)."""
    import processing
    from qgis.core import QgsProcessingException, QgsVectorLayer

    before, after = sample
    pairs = manifest(tmp_path / "pairs.csv", [("small", crop(before, tmp_path / "b.tif"), crop(after, tmp_path / "a.tif"))])
    out = tmp_path / "all.gpkg"
    res = processing.run("changescribe:detectchangesbatch", {
        "MANIFEST": str(pairs), "MODEL": MODEL, "CAPTIONS": False, "WORKERS": 1, "OUTPUT": str(out)})
    layer = QgsVectorLayer(res["OUTPUT"], "regions", "ogr")
    assert layer.isValid() and layer.featureCount() == res["REGION_COUNT"] > 0 and res["FAILED_UNITS"] == 0
    assert "pair" in layer.fields().names()
    assert [r["status"] for r in units(out).values()] == ["done"]
    with pytest.raises(QgsProcessingException, match="give a manifest, or both a before and an after mosaic"):
        processing.run("changescribe:detectchangesbatch", {"BEFORE_MOSAIC": before, "OUTPUT": str(tmp_path / "x.gpkg")})
    with pytest.raises(QgsProcessingException, match="no after path"):
        bad = tmp_path / "bad.csv"
        bad.write_text(f"before\n{before}\n", encoding="utf-8")
        processing.run("changescribe:detectchangesbatch", {"MANIFEST": str(bad), "MODEL": MODEL,
                                                           "OUTPUT": str(tmp_path / "y.gpkg")})
    assert not (tmp_path / "y.gpkg").exists() and not (tmp_path / "y.units").exists()


def test_an_existing_cluster_runs_the_units_and_an_unreachable_one_is_one_line(tmp_path, sample, capsys):
    """`--scheduler ADDRESS`: the units run on that cluster's workers (here a LocalCluster the test starts): a
    manifest, then two mosaics with a layer of areas."""
    from dask.distributed import LocalCluster

    before, after = sample
    pairs = manifest(tmp_path / "pairs.csv", [("small", crop(before, tmp_path / "b.tif"), crop(after, tmp_path / "a.tif"))])
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster:
        result = run_batch([str(pairs)], tmp_path / "out.gpkg", {"model": MODEL, "captions": False},
                           scheduler=cluster.scheduler_address)
        assert not result.failed and result.regions > 0
        assert [r["status"] for r in units(tmp_path / "out.gpkg").values()] == ["done"]

        # two mosaics (VRTs) and a layer of areas: one pair per polygon, each limited to it
        vrts = []
        for src in (before, after):
            vrts.append(str(tmp_path / (Path(src).stem + ".vrt")))
            subprocess.run(["gdalbuildvrt", "-q", vrts[-1], src], check=True)
        with rasterio.open(before) as ds:
            left, bottom, right, top = ds.bounds
        mid = (left + right) / 2
        areas = gpd.GeoDataFrame({"name": ["west", "east"]}, crs="EPSG:32633",
                                 geometry=[box(left, bottom, mid, top), box(mid, bottom, right, top)])
        areas.to_file(tmp_path / "areas.gpkg", driver="GPKG")
        halves = run_batch(vrts, tmp_path / "halves.gpkg", {"model": MODEL, "captions": False},
                           areas=str(tmp_path / "areas.gpkg"), scheduler=cluster.scheduler_address)
    assert not halves.failed and {r["pair"] for r in halves.units} == {"west", "east"}
    found = gpd.read_file(tmp_path / "halves.gpkg", layer="change_regions")
    assert len(found) > 0 and set(found["pair"]) <= {"west", "east"}
    west = found[found["pair"] == "west"]
    assert (west.geometry.bounds["maxx"] <= mid + 1e-6).all()  # each pair stays inside its polygon

    code = main(["batch", str(pairs), "-o", str(tmp_path / "other.gpkg"), "--model", MODEL, "-q",
                 "--scheduler", "tcp://127.0.0.1:9"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "cannot reach the dask scheduler at tcp://127.0.0.1:9" in err[0], err
    assert not (tmp_path / "other.gpkg").exists() and not (tmp_path / "other.units").exists()
