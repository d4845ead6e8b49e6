"""Faults and hostile input (issue 15): nothing lost, no traceback, no silent wrong answer.

Everything here is real: the ``changescribe`` CLI in its own process (or its ``main`` in this one), signals sent to
real processes, a real tmpfs filled to the brim for the full-disk cases, two real processes writing one annotation
store. Each case checks what the user sees (one line, exit code) and what is left on disk (inputs intact, no
temporaries, an earlier output untouched). The README's fault table lists the cases.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin

from changescribe.core.cli import main
from changescribe.training.synthetic import write_pair
from conftest import write_geotiff

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable


# ---- helpers ---------------------------------------------------------------------------------------------------

def digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def listing(folder: Path) -> list[str]:
    """What is in a folder, less torch's own compile cache (torch makes it in TMPDIR at import; not ours)."""
    return sorted(p.name for p in Path(folder).iterdir() if not p.name.startswith("torchinductor_"))


def cli(capsys, *args) -> tuple[int, str]:
    """``changescribe`` in this process: exit code and stderr."""
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err


def one_error_line(err: str) -> str:
    """The user sees exactly one line, ``changescribe: error: ...``, and never a traceback."""
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("changescribe: error:"), err
    assert "Traceback" not in err
    return lines[0]


def cli_process(*args, env: dict | None = None, **popen) -> subprocess.Popen:
    return subprocess.Popen([PY, "-m", "changescribe", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})}, **popen)


def run_cli_process(*args, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "changescribe", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=timeout)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A small synthetic pair with real changes (the shipped model finds them)."""
    return write_pair(tmp_path_factory.mktemp("pair"), name="site", size=160, seed=5)


@pytest.fixture
def inputs(tmp_path, pair):
    """Copies of the pair in this test's folder, with their digests (to prove they survive)."""
    before = Path(shutil.copy(pair.before, tmp_path / "before.tif"))
    after = Path(shutil.copy(pair.after, tmp_path / "after.tif"))
    return before, after, {before: digest(before), after: digest(after)}


def assert_intact(sums: dict) -> None:
    for path, value in sums.items():
        assert path.exists() and digest(path) == value, f"{path} was changed"


def detect_args(before, after, out, *extra) -> list:
    return ["detect", before, after, "-o", out, "-q", "--device", "cpu", "--no-captions", *extra]


# ---- 1. outputs never replace inputs or someone else's files ---------------------------------------------------

def test_probability_output_onto_the_before_raster_is_refused(tmp_path, inputs, capsys):
    before, after, sums = inputs
    code, err = cli(capsys, *detect_args(before, after, tmp_path / "out.gpkg", "--probability", before))
    line = one_error_line(err)
    assert code == 2 and "would overwrite the input" in line and str(before) in line
    assert_intact(sums)
    assert listing(tmp_path) == ["after.tif", "before.tif"]


def test_output_through_a_symlink_or_hard_link_to_an_input_is_refused(tmp_path, inputs, capsys):
    before, after, sums = inputs
    (tmp_path / "alias.tif").symlink_to(after)
    os.link(before, tmp_path / "hard.tif")
    for target in ("alias.tif", "hard.tif"):
        code, err = cli(capsys, *detect_args(before, after, tmp_path / "o.gpkg", "--probability", tmp_path / target))
        assert code == 2 and "would overwrite" in one_error_line(err)
    assert_intact(sums)
    assert not (tmp_path / "o.gpkg").exists()


def test_output_onto_a_file_gdal_reads_with_an_input_is_refused(tmp_path, inputs, capsys):
    """A VRT input reads its source: writing the probability map onto that source is refused (GDAL's file list)."""
    before, after, sums = inputs
    vrt = tmp_path / "before.vrt"
    subprocess.run(["gdal_translate", "-q", "-of", "VRT", str(before), str(vrt)], check=True)
    code, err = cli(capsys, *detect_args(vrt, after, tmp_path / "o.gpkg", "--probability", before))
    line = one_error_line(err)
    assert code == 2 and "a file of the input" in line
    assert_intact(sums)


def test_output_named_like_a_sidecar_of_an_input_is_refused(tmp_path, inputs, capsys):
    before, after, sums = inputs
    code, err = cli(capsys, *detect_args(before, after, tmp_path / "before.tif.regions.gpkg"))
    assert code == 2 and "sidecar" in one_error_line(err)
    assert listing(tmp_path) == ["after.tif", "before.tif"]


def test_geopackage_output_onto_a_geopackage_raster_input_is_refused(tmp_path, inputs, capsys):
    before, after, _ = inputs
    gpkg_raster = tmp_path / "before_raster.gpkg"
    subprocess.run(["gdal_translate", "-q", "-of", "GPKG", str(before), str(gpkg_raster)], check=True)
    value = digest(gpkg_raster)
    code, err = cli(capsys, *detect_args(gpkg_raster, after, gpkg_raster))
    assert code == 2 and "would overwrite the input" in one_error_line(err)
    assert digest(gpkg_raster) == value


def test_someone_elses_geopackage_is_not_replaced_without_overwrite(tmp_path, inputs, capsys):
    before, after, sums = inputs
    theirs = tmp_path / "theirs.gpkg"
    con = sqlite3.connect(theirs)
    con.execute("CREATE TABLE precious (x)")
    con.execute("INSERT INTO precious VALUES (42)")
    con.commit()
    con.close()
    value = digest(theirs)
    code, err = cli(capsys, *detect_args(before, after, theirs))
    assert code == 2 and "not written by ChangeScribe" in one_error_line(err)
    assert digest(theirs) == value
    code, err = cli(capsys, *detect_args(before, after, theirs, "--overwrite"))
    assert code == 0, err
    con = sqlite3.connect(theirs)
    assert con.execute("SELECT count(*) FROM changescribe_runs").fetchone()[0] == 1
    con.close()
    assert_intact(sums)


def test_own_outputs_are_replaced_by_a_rerun_and_foreign_rasters_are_not(tmp_path, inputs, capsys):
    before, after, sums = inputs
    out, prob = tmp_path / "out.gpkg", tmp_path / "prob.tif"
    assert cli(capsys, *detect_args(before, after, out, "--probability", prob))[0] == 0
    with rasterio.open(prob) as ds:
        assert ds.tags().get("CHANGESCRIBE_OUTPUT") == "probability"
    assert cli(capsys, *detect_args(before, after, out, "--probability", prob, "--threshold", "0.6"))[0] == 0
    foreign = write_geotiff(tmp_path / "dem.tif", np.ones((1, 8, 8), np.float32))
    value = digest(foreign)
    code, err = cli(capsys, *detect_args(before, after, out, "--probability", foreign))
    assert code == 2 and "not written by ChangeScribe" in one_error_line(err)
    assert digest(foreign) == value
    assert_intact(sums)


def test_output_path_that_is_a_folder_is_refused(tmp_path, inputs, capsys):
    before, after, _ = inputs
    (tmp_path / "result.gpkg").mkdir()
    code, err = cli(capsys, *detect_args(before, after, tmp_path / "result.gpkg"))
    assert code == 2 and "is a folder" in one_error_line(err)
    assert listing(tmp_path / "result.gpkg") == []


# ---- 2. two writers on one annotation store ---------------------------------------------------------------------

WRITER = """
import sys
from shapely.geometry import box
from changescribe.core.annotations import add_annotations, annotation_record
path, tag, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
for i in range(n):  # one save per annotation, as an analyst (or a script) saves them
    x = 500000 + 2 * i + (0 if tag == "a" else 1)
    add_annotations(path, [(box(x, 4999950, x + 1, 4999951), annotation_record(f"{tag} {i}"))])
print("saved", n)
"""

LOCKER = """
import sqlite3, sys, time
con = sqlite3.connect(sys.argv[1], isolation_level=None)
con.execute("BEGIN IMMEDIATE")  # the write lock, as a long save by another program holds it
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
con.execute("ROLLBACK")
"""


def hold_lock(store: Path, seconds: float) -> subprocess.Popen:
    proc = subprocess.Popen([PY, "-c", LOCKER, str(store), str(seconds)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_two_processes_saving_at_once_lose_nothing_and_counts_agree(tmp_path, pair):
    import fiona

    from changescribe.core.annotations import create_store, integrity_ok
    from changescribe.core.training_export import CAPTIONS_FILE, export_training_data

    store = create_store(tmp_path / "store.gpkg", "EPSG:32633")
    procs = [subprocess.Popen([PY, "-c", WRITER, str(store), tag, "40"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for tag in "ab"]
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0 and "saved 40" in out and "Traceback" not in err, err[-2000:]
    con = sqlite3.connect(store)
    assert con.execute("SELECT count(*), count(DISTINCT caption) FROM annotations").fetchone() == (80, 80)
    con.close()
    assert integrity_ok(store)
    with fiona.open(store, layer="annotations") as src:
        assert len(src) == 80 and len(list(src)) == 80
    summary = export_training_data(store, pair.before, pair.after, tmp_path / "export", tile_size=32, gsd=0.5)
    assert sum(summary.counts.values()) + summary.skipped == 80
    import json

    assert len(json.loads((tmp_path / "export" / CAPTIONS_FILE).read_text())["images"]) == \
        sum(summary.counts.values())


def test_a_save_into_a_store_locked_too_long_says_so_and_writes_nothing(tmp_path, monkeypatch):
    from shapely.geometry import box

    from changescribe.core import annotations
    from changescribe.core.annotations import StoreBusyError, add_annotations, annotation_record, create_store

    store = create_store(tmp_path / "store.gpkg", "EPSG:32633")
    monkeypatch.setattr(annotations, "BUSY_TIMEOUT_S", 1.0)
    locker = hold_lock(store, 4)
    started = time.monotonic()
    with pytest.raises(StoreBusyError, match="busy.*not saved.*retry"):
        add_annotations(store, [(box(500000, 4999900, 500001, 4999901), annotation_record("kept"))])
    assert 1.0 <= time.monotonic() - started < 3.5  # bounded wait
    locker.wait(timeout=30)
    assert add_annotations(store, [(box(500000, 4999900, 500001, 4999901), annotation_record("kept"))]) == 1
    assert list(annotations.read_annotations(store)["caption"]) == ["kept"]


def test_a_short_lock_is_waited_out(tmp_path):
    from shapely.geometry import box

    from changescribe.core.annotations import add_annotations, annotation_record, create_store, read_annotations

    store = create_store(tmp_path / "store.gpkg", "EPSG:32633")
    locker = hold_lock(store, 1.5)
    assert add_annotations(store, [(box(500000, 4999900, 500001, 4999901), annotation_record("waited"))]) == 1
    locker.wait(timeout=30)
    assert list(read_annotations(store)["caption"]) == ["waited"]


def test_dock_panel_keeps_an_edit_the_locked_store_refused_and_retries(qgis_app, tmp_path, monkeypatch):
    from qgis.core import QgsCoordinateReferenceSystem, QgsGeometry, QgsProject, QgsRectangle
    from qgis.gui import QgsMapCanvas

    from changescribe.core import annotations
    from changescribe.plugin.dock_widgets_annotate import AnnotatePanel

    store = annotations.create_store(tmp_path / "store.gpkg", "EPSG:32633")
    monkeypatch.setattr(annotations, "BUSY_TIMEOUT_S", 1.0)
    canvas = QgsMapCanvas()
    canvas.setDestinationCrs(QgsCoordinateReferenceSystem("EPSG:32633"))
    panel = AnnotatePanel(canvas, lambda: (None, None), lambda: None)
    try:
        assert panel.set_store(store)
        panel.set_area(QgsGeometry.fromRect(QgsRectangle(500000, 4999900, 500010, 4999910)))
        panel.caption_edit.setPlainText("a house is built")
        locker = hold_lock(store, 5)
        assert panel.save() is False
        status = panel.status_label.text()
        assert "busy" in status and "retry" in status
        assert panel.caption_edit.toPlainText() == "a house is built" and panel.geometry is not None
        assert panel.save_button.text() == "Retry save" and not panel.layer.isModified()
        locker.wait(timeout=30)
        assert panel.save() is True, panel.status_label.text()
        assert list(annotations.read_annotations(store)["caption"]) == ["a house is built"]
    finally:
        panel.shutdown()
        QgsProject.instance().removeAllMapLayers()


# ---- 3. non-finite pixels are no data ---------------------------------------------------------------------------

def float_copy(src: Path, dst: Path, bad: float | None = None, block: int = 40) -> Path:
    """The raster as float32, with a ``block``² square of ``bad`` values in its top-left corner."""
    with rasterio.open(src) as ds:
        data = ds.read().astype(np.float32) * 3.7 + 100.0  # not 8-bit: the 2–98 % stretch runs
        profile = {**ds.profile, "dtype": "float32", "nodata": None}
    if bad is not None:
        data[:, :block, :block] = bad
    with rasterio.open(dst, "w", **profile) as out:
        out.write(data)
    return dst


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
def test_non_finite_pixels_are_no_data_and_detection_elsewhere_holds(tmp_path, pair, bad):
    import geopandas as gpd
    from shapely.geometry import box

    from changescribe.core.pipeline import detect_changes

    clean_b, clean_a = float_copy(pair.before, tmp_path / "b.tif"), float_copy(pair.after, tmp_path / "a.tif")
    dirty_b = float_copy(pair.before, tmp_path / "b_bad.tif", bad)
    kw = dict(device="cpu", captions=False, threshold=0.5)
    # the generated-scenes model: these pairs are generated scenes, whose changes it was taught
    clean = detect_changes(clean_b, clean_a, "pix4cap-synthetic", tmp_path / "clean.gpkg", **kw)
    dirty = detect_changes(dirty_b, clean_a, "pix4cap-synthetic", tmp_path / "dirty.gpkg", **kw)
    assert len(clean.regions) > 0
    with rasterio.open(dirty_b) as ds:
        corner = box(ds.bounds.left, ds.bounds.top - 40 * 0.5, ds.bounds.left + 40 * 0.5, ds.bounds.top)
    kept = gpd.read_file(tmp_path / "clean.gpkg")
    kept = kept[~kept.intersects(corner.buffer(8.0))]  # regions away from the bad corner (and its halo)
    found = gpd.read_file(tmp_path / "dirty.gpkg")
    assert len(kept) > 0 and len(found) >= len(kept)
    assert found.unary_union.intersection(kept.unary_union).area >= 0.8 * kept.unary_union.area
    assert not found.intersects(corner.buffer(-1.0)).any()  # nothing is reported inside the no-data square


# ---- 5. damaged files: one line naming the file, exit 2, nothing left -------------------------------------------

def damaged_copy(src: Path, dst: Path, how: str) -> Path:
    """A tiled, deflate-compressed copy of ``src``, then truncated or with its compressed tiles overwritten."""
    subprocess.run(["gdal_translate", "-q", "-co", "TILED=YES", "-co", "BLOCKXSIZE=64", "-co", "BLOCKYSIZE=64",
                    "-co", "COMPRESS=DEFLATE", str(src), str(dst)], check=True)
    raw = bytearray(dst.read_bytes())
    if how == "truncated":
        raw = raw[: len(raw) * 2 // 3]
    else:
        for i in range(len(raw) // 3, len(raw) - 64, 401):
            raw[i:i + 40] = b"\xa5" * 40
    dst.write_bytes(bytes(raw))
    with rasterio.open(dst) as ds:  # it still opens: the damage shows only when pixels are read
        assert ds.width > 0
    return dst


@pytest.mark.parametrize("how", ["truncated", "corrupt_tiles"])
@pytest.mark.parametrize("role", ["before", "after"])
def test_damaged_geotiff_is_one_line_naming_the_file(tmp_path, inputs, how, role):
    before, after, sums = inputs
    bad = damaged_copy(before if role == "before" else after, tmp_path / f"{role}_{how}.tif", how)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    args = (bad, after) if role == "before" else (before, bad)
    proc = run_cli_process(*detect_args(*args, out_dir / "r.gpkg"))
    line = one_error_line(proc.stderr)
    assert proc.returncode == 2 and str(bad) in line and f"{role} raster" in line and "damaged" in line
    assert listing(out_dir) == []
    assert_intact(sums)


# ---- 6. output problems: read-only, full disk (a real tmpfs), qgis_process ---------------------------------------

@pytest.fixture
def tmpfs(tmp_path):
    """Mount a small real tmpfs (root only); the test is skipped with the reason when mounting is not allowed."""
    mounted = []

    def mount(name: str, size: str = "2m", read_only: bool = False) -> Path:
        point = tmp_path / name
        point.mkdir()
        options = f"size={size}" + (",ro" if read_only else "")
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)], capture_output=True,
                              text=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip() or 'not permitted'})")
        mounted.append(point)
        return point

    yield mount
    for point in reversed(mounted):
        subprocess.run(["umount", "-l", str(point)], check=False)


def fill(folder: Path, leave: int) -> None:
    """Fill ``folder``'s file system until only about ``leave`` bytes are free."""
    st = os.statvfs(folder)
    free = st.f_bavail * st.f_frsize
    with open(folder / "filler.bin", "wb") as fh:
        fh.write(b"\0" * max(0, free - leave))
    os.sync()


def test_read_only_output_folder(tmp_path, inputs, tmpfs):
    before, after, sums = inputs
    ro = tmpfs("ro", read_only=True)
    proc = run_cli_process(*detect_args(before, after, ro / "r.gpkg"))
    line = one_error_line(proc.stderr)
    assert proc.returncode == 2 and "Read-only file system" in line and str(ro) in line
    assert listing(ro) == []
    assert_intact(sums)


def test_output_folder_without_write_permission(tmp_path, inputs):
    before, after, _ = inputs
    locked = tmp_path / "locked"
    locked.mkdir()
    os.chmod(locked, 0o555)
    try:
        env = None
        cmd = detect_args(before, after, locked / "r.gpkg")
        if os.geteuid() == 0:  # root ignores permission bits: run as nobody
            cmd = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", PY, "-m", "changescribe", *cmd]
            os.chmod(tmp_path, 0o755)
            proc = subprocess.run(list(map(str, cmd)), capture_output=True, text=True, timeout=300,
                                  env={**os.environ, "HOME": str(tmp_path)})
        else:
            proc = run_cli_process(*cmd, env=env)
        line = one_error_line(proc.stderr)
        assert proc.returncode == 2 and "Permission denied" in line
        assert listing(locked) == []
    finally:
        os.chmod(locked, 0o755)


def test_full_disk_during_the_geopackage_keeps_the_earlier_output(tmp_path, inputs, tmpfs):
    before, after, sums = inputs
    disk = tmpfs("disk", "2m")
    out = disk / "changes.gpkg"
    first = run_cli_process(*detect_args(before, after, out))
    assert first.returncode == 0, first.stderr
    old = digest(out)
    fill(disk, 8 * 1024)
    proc = run_cli_process(*detect_args(before, after, out, "--threshold", "0.7"))
    line = one_error_line(proc.stderr)
    assert proc.returncode == 2 and "disk is full" in line and "GeoPackage" in line
    assert digest(out) == old
    assert listing(disk) == ["changes.gpkg", "filler.bin"]
    assert_intact(sums)


def test_full_disk_for_the_probability_raster_keeps_the_earlier_one(tmp_path, inputs, tmpfs):
    before, after, sums = inputs
    disk = tmpfs("disk", "2m")
    prob = disk / "prob.tif"
    first = run_cli_process(*detect_args(before, after, tmp_path / "a.gpkg", "--probability", prob))
    assert first.returncode == 0, first.stderr
    old = digest(prob)
    fill(disk, 4 * 1024)
    proc = run_cli_process(*detect_args(before, after, tmp_path / "b.gpkg", "--probability", prob))
    line = one_error_line(proc.stderr)
    assert proc.returncode == 2 and "probability raster" in line and ("free" in line or "full" in line)
    assert digest(prob) == old
    assert listing(disk) == ["filler.bin", "prob.tif"]
    assert not (tmp_path / "b.gpkg").exists()


def test_full_temporary_folder_is_said_before_inference(tmp_path, inputs, tmpfs):
    before, after, sums = inputs
    tmp = tmpfs("tmp", "2m")
    fill(tmp, 16 * 1024)
    proc = run_cli_process(*detect_args(before, after, tmp_path / "r.gpkg"), env={"TMPDIR": str(tmp)})
    line = one_error_line(proc.stderr)
    assert proc.returncode == 2 and "not enough free space for the temporary probability raster" in line
    assert listing(tmp) == ["filler.bin"] and not (tmp_path / "r.gpkg").exists()


def test_temporary_folder_filling_up_mid_run_is_one_line(tmp_path, pair, tmpfs):
    """The estimate passes (there is room for the raw map), but something else fills the disk while it runs."""
    big = write_pair(tmp_path / "big", name="big", size=512, seed=2)
    tmp = tmpfs("tmp", "2m")
    fill(tmp, 1_100_000)  # 512² float32 = 1 MiB fits the check...
    proc = cli_process(*detect_args(big.before, big.after, tmp_path / "r.gpkg"), env={"TMPDIR": str(tmp)})
    time.sleep(0.5)
    with open(tmp / "filler2.bin", "wb") as fh:  # ...then another program takes what is left
        with pytest.raises(OSError):
            while True:
                fh.write(b"\0" * 65536)
                fh.flush()
    _, err = proc.communicate(timeout=300)
    if proc.returncode == 0:
        pytest.skip("the run finished before the disk filled up")
    line = one_error_line(err)
    assert proc.returncode == 2 and ("disk is full" in line or "not enough free space" in line)
    assert sorted(listing(tmp)) == ["filler.bin", "filler2.bin"]


# ---- 8. every torch.load goes through one guarded loader ----------------------------------------------------------

class Evil:
    """Unpickling this would run code: the loader must refuse the file, not run it."""

    def __reduce__(self):
        return (os.system, ("touch /tmp/changescribe-pwned",))


def test_torch_load_is_weights_only_except_the_restricted_unpickler():
    import ast

    calls = []
    for folder in ("core", "plugin", "training"):
        for path in (REPO / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load" \
                        and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch":
                    calls.append((path.relative_to(REPO).as_posix(), node))
    assert {p for p, _ in calls} == {"core/checkpoints.py"} and len(calls) <= 2
    # every call is weights_only=True, except one that passes the restricted unpickler (checkpoints that pickle
    # whole modules, issue 19: only torch's tensor rebuilders resolve; tests/test_published.py runs a payload)
    plain = restricted = 0
    for _, node in calls:
        kwargs = {k.arg: k.value for k in node.keywords}
        assert isinstance(kwargs["weights_only"], ast.Constant)
        if kwargs["weights_only"].value is True:
            plain += 1
        else:
            module = kwargs.get("pickle_module")
            assert isinstance(module, ast.Call) and module.func.id == "_restricted_pickle_module"
            restricted += 1
    assert plain == 1 and restricted <= 1


@pytest.mark.parametrize("damage", ["pickled", "truncated", "not_torch"])
def test_backbone_weights_that_need_unpickling_or_are_damaged_are_one_clear_error(tmp_path, damage):
    import torch

    from changescribe.core.errors import ModelError
    from changescribe.core.models.backbones import ResNetBackbone

    path = tmp_path / "resnet18.pth"
    if damage == "pickled":
        torch.save({"state_dict": {"conv1.weight": torch.zeros(1)}, "hook": Evil()}, path)
        match = "refused - this checkpoint holds pickled Python objects"
    elif damage == "truncated":
        torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7)}, path)
        path.write_bytes(path.read_bytes()[:500])
        match = "cannot be read as a torch checkpoint"
    else:
        path.write_text("this is not a checkpoint")
        match = "cannot be read as a torch checkpoint"
    Path("/tmp/changescribe-pwned").unlink(missing_ok=True)
    with pytest.raises(ModelError, match=match):
        ResNetBackbone("resnet18").load_pretrained(path)
    assert not Path("/tmp/changescribe-pwned").exists()


def test_a_pickled_llm_named_in_a_config_is_refused_through_the_same_loader(tmp_path):
    pytest.importorskip("transformers")
    import json

    import torch

    from changescribe.core.errors import ModelError
    from changescribe.core.models.registry import build_model, config_from_dict

    llm = tmp_path / "llm"
    llm.mkdir()
    (llm / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
                                                 "num_hidden_layers": 1, "num_attention_heads": 2,
                                                 "vocab_size": 100}))
    torch.save({"model.embed_tokens.weight": torch.zeros(100, 64), "evil": Evil()}, llm / "pytorch_model.bin")
    Path("/tmp/changescribe-pwned").unlink(missing_ok=True)
    config = config_from_dict("semantic-cc-small", {"llm_path": str(llm), "llm_hidden": 64})
    with pytest.raises(ModelError, match="refused - this checkpoint holds pickled Python objects"):
        build_model("semantic-cc-small", config)
    assert not Path("/tmp/changescribe-pwned").exists()


# ---- 9, 10. signals mid-run, a killed worker, stale temporaries ------------------------------------------------------

@pytest.fixture(scope="module")
def big_pair(tmp_path_factory):
    """Large enough that inference and the (captioned) region stage each last seconds on a CPU."""
    return write_pair(tmp_path_factory.mktemp("big"), name="big", size=1024, seed=9, change_level=0.8)


class StderrWatch:
    """Collects a process's stderr in a thread; ``wait_for`` blocks until a text shows up (the progress bar)."""

    def __init__(self, proc: subprocess.Popen):
        import threading

        self.text = ""
        self.proc = proc
        self.thread = threading.Thread(target=self._pump, daemon=True)
        self.thread.start()

    def _pump(self) -> None:
        while True:
            chunk = self.proc.stderr.read(1)
            if not chunk:
                return
            self.text += chunk

    def wait_for(self, needle: str, timeout: float = 1500) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.proc.poll() is None:
            if needle in self.text:
                return True
            time.sleep(0.05)
        return needle in self.text

    def finish(self, timeout: float = 600) -> str:
        """Wait for the exit (on a loaded machine a niced interpreter's own shutdown can take a minute)."""
        self.proc.wait(timeout=timeout)
        self.thread.join(timeout=10)
        return self.text


def ours(folder: Path) -> list[str]:
    """ChangeScribe's own temporaries in a folder (files beside outputs, run folders in TMPDIR)."""
    return sorted(p.name for p in Path(folder).iterdir() if "changescribe" in p.name)


@pytest.mark.timeout(2400)  # a 1024² run up to its region stage takes minutes on a loaded 2-core machine
@pytest.mark.parametrize("sig, code, stage", [
    (signal.SIGTERM, 143, "tile "), (signal.SIGTERM, 143, "regions: "),
    (signal.SIGINT, 130, "tile "), (signal.SIGINT, 130, "regions: ")],
    ids=["sigterm-inference", "sigterm-regions", "sigint-inference", "sigint-regions"])
def test_a_signal_mid_run_is_a_clean_stop(tmp_path, big_pair, sig, code, stage):
    out_dir, tmp = tmp_path / "out", tmp_path / "tmp"
    out_dir.mkdir()
    tmp.mkdir()
    args = ["detect", big_pair.before, big_pair.after, "-o", out_dir / "r.gpkg", "--device", "cpu",
            "--probability", out_dir / "p.tif", "--batch-size", "2"]
    proc = cli_process(*args, env={"TMPDIR": str(tmp)})
    watch = StderrWatch(proc)
    try:
        reached = watch.wait_for(stage)
        assert reached, watch.text[-2000:]
        proc.send_signal(sig)
        err = watch.finish()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == code, err[-2000:]
    last = err.strip().replace("\r", "\n").splitlines()[-1]
    name = "terminated (SIGTERM)" if sig == signal.SIGTERM else "interrupted"
    assert last == f"changescribe: {name}; nothing was written" and "Traceback" not in err
    assert listing(out_dir) == [] and ours(tmp) == []


def child_pids(parent: int) -> list[int]:
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == parent:
            pids.append(int(stat.parent.name))
    return pids


@pytest.mark.timeout(2400)
def test_dock_worker_killed_during_region_finding_leaves_nothing(tmp_path, big_pair):
    from changescribe.core.api import DetectRequest
    from changescribe.plugin.worker_client import WorkerError, run_worker

    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "changescribe").symlink_to(REPO, target_is_directory=True)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    request = DetectRequest(before=str(big_pair.before), after=str(big_pair.after), output=str(out_dir / "r.gpkg"),
                            probability_output=str(out_dir / "p.tif"), device="cpu", batch_size=2)
    killed = []

    def on_event(event: dict) -> None:
        if not killed and "regions" in str(event.get("message", "")):
            seen = set(os.listdir(out_dir))
            for pid in child_pids(os.getpid()):
                os.kill(pid, signal.SIGKILL)
                killed.append((pid, seen))

    with pytest.raises(WorkerError, match="stopped"):
        run_worker(PY, request, on_event, lambda: False, plugin_parent=str(plugins))
    assert killed, "the worker never reached region finding"
    assert any("changescribe" in name for name in killed[0][1]), "no temporary existed when the worker was killed"
    assert listing(out_dir) == []


def dead_pid() -> int:
    proc = subprocess.Popen([PY, "-c", "pass"])
    proc.wait()
    return proc.pid


def plant_leftovers(folder: Path) -> tuple[list[Path], list[Path]]:
    """Temporaries of a dead run (to go) beside files that must stay: a live process's, a user's look-alikes."""
    dead = dead_pid()
    stale = [folder / f".changes.changescribe-{dead}-k2j4h6g8.tmp.gpkg",
             folder / f".changes.changescribe-{dead}-k2j4h6g8.tmp.gpkg-wal",
             folder / f".p.changescribe-{dead}-x9y8z7w6.tmp.tif"]
    keep = [folder / ".changes.changescribe-1-a1b2c3d4.tmp.gpkg",  # pid 1 runs: not stale
            folder / "changes.changescribe-backup.gpkg", folder / ".my.changescribe-notes.txt",
            folder / f"changescribe-{dead}-keep.txt"]  # not a folder: only run folders match that form
    for p in stale + keep:
        p.write_bytes(b"x")
    return stale, keep


def test_a_later_run_removes_stale_temporaries_and_nothing_else(tmp_path, inputs, capsys):
    before, after, _ = inputs
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    stale, keep = plant_leftovers(out_dir)
    code, err = cli(capsys, *detect_args(before, after, out_dir / "changes.gpkg"))
    assert code == 0, err
    assert not any(p.exists() for p in stale) and all(p.exists() for p in keep)


def test_changescribe_clean_removes_stale_temporaries_and_nothing_else(tmp_path):
    stale, keep = plant_leftovers(tmp_path)
    stale_dir = tmp_path / f"changescribe-{dead_pid()}-abcd1234"
    stale_dir.mkdir()
    (stale_dir / "change_probability.tif").write_bytes(b"x")
    proc = run_cli_process("clean", tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "4 temporary file(s) of crashed runs removed" in proc.stdout
    assert not any(p.exists() for p in stale) and not stale_dir.exists() and all(p.exists() for p in keep)


@pytest.mark.timeout(2400)
def test_a_cli_killed_with_sigkill_is_cleaned_up_by_changescribe_clean(tmp_path, big_pair):
    out_dir, tmp = tmp_path / "out", tmp_path / "tmp"
    out_dir.mkdir()
    tmp.mkdir()
    proc = cli_process("detect", big_pair.before, big_pair.after, "-o", out_dir / "r.gpkg", "--device", "cpu",
                       "--batch-size", "2", env={"TMPDIR": str(tmp)})
    watch = StderrWatch(proc)
    try:
        assert watch.wait_for("regions: "), watch.text[-2000:]
    finally:
        proc.kill()
        watch.finish()
    assert ours(out_dir) and ours(tmp)  # SIGKILL cannot clean up: the leftovers are there
    done = run_cli_process("clean", out_dir, env={"TMPDIR": str(tmp)})
    assert done.returncode == 0, done.stderr
    assert listing(out_dir) == [] and ours(tmp) == []


# ---- qgis_process and Processing: the same one-line errors, never a raw Traceback -------------------------------------

def qgis_process(*params: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(REPO / "scripts" / "qgis_process.sh"), "run", "changescribe:detectchanges", "--",
                           *params], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "QT_QPA_PLATFORM": "offscreen"})


@pytest.mark.parametrize("fault", ["read_only", "disk_full"])
def test_qgis_process_output_faults_are_one_error_line(tmp_path, inputs, tmpfs, fault):
    before, after, sums = inputs
    if fault == "read_only":
        folder, needle = tmpfs("ro", read_only=True), "Read-only file system"
    else:
        folder, needle = tmpfs("disk", "2m"), "disk is full"
        fill(folder, 8 * 1024)
    proc = qgis_process(f"BEFORE={before}", f"AFTER={after}", f"OUTPUT={folder / 'r.gpkg'}", "CAPTIONS=false",
                        "DEVICE=cpu")
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "Traceback" not in text, text[-3000:]
    errors = [line for line in text.splitlines() if line.startswith("ERROR:")]
    assert errors and needle in errors[0], text[-3000:]
    assert [n for n in listing(folder) if n != "filler.bin"] == []
    assert_intact(sums)


def test_processing_report_onto_someone_elses_html_is_refused(qgis_app, tmp_path, inputs):
    import processing
    from qgis.core import QgsProcessingException

    before, after, sums = inputs
    theirs = tmp_path / "notes.html"
    theirs.write_text("<html><body>my notes</body></html>")
    with pytest.raises(QgsProcessingException, match="not written by ChangeScribe"):
        processing.run("changescribe:detectchanges", {"BEFORE": str(before), "AFTER": str(after),
                                                      "OUTPUT": str(tmp_path / "r.gpkg"), "REPORT": str(theirs),
                                                      "CAPTIONS": False, "DEVICE": "cpu"})
    assert theirs.read_text() == "<html><body>my notes</body></html>"
    assert not (tmp_path / "r.gpkg").exists()
    assert_intact(sums)


def test_cached_run_never_copies_its_probability_map_onto_an_input(tmp_path, inputs, capsys):
    """With --cache the map is written into the cache and copied out afterwards: that copy is checked as well."""
    before, after, sums = inputs
    code, err = cli(capsys, *detect_args(before, after, tmp_path / "o.gpkg", "--cache", tmp_path / "cache",
                                         "--probability", after))
    assert code == 2 and "would overwrite the input" in one_error_line(err)
    assert_intact(sums)
    assert not (tmp_path / "o.gpkg").exists()


def test_worker_job_onto_its_own_input_is_one_error_event(tmp_path, inputs):
    import json

    before, after, sums = inputs
    job = {"before": str(before), "after": str(after), "output": str(tmp_path / "o.gpkg"),
           "probability_output": str(before), "device": "cpu"}
    proc = subprocess.run([PY, "-m", "changescribe.core.worker", "--ignore-stdin-eof"], input=json.dumps(job) + "\n",
                          capture_output=True, text=True, timeout=300)
    events = [json.loads(line) for line in proc.stdout.splitlines()]
    assert proc.returncode == 2 and events[-1]["event"] == "error" and "would overwrite the input" in \
        events[-1]["message"], proc.stdout + proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert_intact(sums)
