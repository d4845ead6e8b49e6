"""Analyst annotations: the store keeps every committed edit (also through QGIS, across a crash), the export
writes a LEVIR-MCI dataset split by area, and training on it yields a model the pipeline loads and runs."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from shapely.geometry import box

from changescribe.core.annotations import (AnnotationStoreError, FIELDS, add_annotations, annotation_record,
                                           check_store, create_store, integrity_ok, read_annotations)
from changescribe.training.synthetic import write_pair
from changescribe.core.training_export import (CAPTIONS_FILE, SPLITS, assign_splits, export_training_data,
                                               main as export_main)

REPO = Path(__file__).resolve().parent.parent
SHARED_CAPTIONS = REPO.parent / "shared" / "data" / "levircc_captions.json"
PY = str(REPO / ".venv" / "bin" / "python") if (REPO / ".venv" / "bin" / "python").exists() else sys.executable
TILE = 64
GSD = 0.5


def _px_box(files, r0, c0, r1, c1):
    """A polygon in the pair's CRS from a pixel bbox (rows/cols of the before grid, 0.5 m, origin 500000/5000000)."""
    x0, y0 = 500000.0, 5000000.0
    return box(x0 + c0 * GSD, y0 - r1 * GSD, x0 + c1 * GSD, y0 - r0 * GSD)


@pytest.fixture(scope="module")
def annotated(tmp_path_factory):
    """A 512 px synthetic pair with 5 annotations: 3 changes from the generator, 2 no-change corners."""
    d = tmp_path_factory.mktemp("annot")
    files = write_pair(d, "p", size=512, seed=3, change_level=0.8)
    changes = json.loads(files.captions.read_text())["changes"]
    store = create_store(d / "annotations.gpkg", "EPSG:32633")
    picked = [c for c in changes if c["object"] == "building"][:2] + [c for c in changes if c["object"] == "road"][:1]
    assert len(picked) == 3
    items = []
    for c in picked:
        cls = "road" if c["object"] == "road" else "building"
        items.append((_px_box(files, *c["bbox"]),
                      annotation_record(f"a {c['object']} is built", "the scene is the same", cls,
                                        before_source=str(files.before), after_source=str(files.after),
                                        model_name="pix4cap-synthetic")))
    for r0, c0 in ((4, 4), (440, 440)):
        items.append((_px_box(files, r0, c0, r0 + 40, c0 + 40), annotation_record("", "", None, no_change=True)))
    assert add_annotations(store, items) == 5
    return files, store, picked


def test_store_schema_wal_and_refusals(tmp_path):
    store = create_store(tmp_path / "s.gpkg", "EPSG:32633")
    assert check_store(store) == store
    con = sqlite3.connect(store)
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    cols = {r[1] for r in con.execute('PRAGMA table_info("annotations")')}
    con.close()
    assert set(FIELDS) <= cols
    assert create_store(store, "EPSG:32633") == store  # an existing valid store is reused, not overwritten
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp file left
    other = tmp_path / "other.gpkg"
    other.write_bytes(b"not a geopackage")
    with pytest.raises(AnnotationStoreError, match="not overwritten"):
        create_store(other, "EPSG:32633")
    assert other.read_bytes() == b"not a geopackage"
    with pytest.raises(AnnotationStoreError, match="not a ChangeScribe annotation store"):
        check_store(other)
    with pytest.raises(AnnotationStoreError, match="does not exist"):
        check_store(tmp_path / "missing.gpkg")
    os.chmod(store, 0o444)
    try:
        with pytest.raises(AnnotationStoreError, match="read-only"):
            check_store(store)
        with pytest.raises(AnnotationStoreError, match="read-only"):
            add_annotations(store, [(box(0, 0, 1, 1), annotation_record("x"))])
    finally:
        os.chmod(store, 0o644)
    ro = tmp_path / "ro"
    ro.mkdir()
    os.chmod(ro, 0o555)
    try:
        with pytest.raises(AnnotationStoreError, match="read-only"):
            create_store(ro / "s.gpkg", "EPSG:32633")
    finally:
        os.chmod(ro, 0o755)


def test_split_blocks_keep_overlapping_chips_together():
    feet = [(0, 0, 10, 10), (5, 5, 15, 15), (100, 100, 110, 110), (200, 0, 210, 10), (0, 200, 10, 210),
            (300, 300, 310, 310), (14, 14, 24, 24)]
    splits, blocks = assign_splits(feet, cell=20, seed=1)
    assert splits[0] == splits[1] == splits[6] and blocks == 5
    assert set(splits) <= set(SPLITS) and splits.count("train") >= 3


def test_export_layout_masks_and_area_split(annotated, tmp_path):
    files, store, picked = annotated
    anns = read_annotations(store)
    assert len(anns) == 5 and anns["no_change"].sum() == 2 and anns["edited"].sum() == 3
    out = tmp_path / "dataset"
    summary = export_training_data(store, files.before, files.after, out, tile_size=TILE, gsd=GSD, seed=0,
                                   block_chips=2)
    assert sum(summary.counts.values()) == 5 and summary.blocks >= 2
    data = json.loads((out / CAPTIONS_FILE).read_text())["images"]
    assert len(data) == 5
    for rec in data:
        assert set(rec) == {"filename", "filepath", "split", "imgid", "sentences", "changeflag", "sentids"}
        d = out / "images" / rec["split"]
        a, b, lab = (np.asarray(Image.open(d / sub / rec["filename"])) for sub in ("A", "B", "label"))
        assert a.shape == b.shape == (TILE, TILE, 3) and lab.shape == (TILE, TILE)
        assert not (lab == 255).any()
        if rec["changeflag"]:
            assert lab.any() and set(np.unique(lab)) <= {0, 1, 2}
        else:
            assert not lab.any() and rec["sentences"][0]["tokens"] == ["there", "is", "no", "difference"]
    # no ground shared across splits: chip footprints of different splits never overlap
    feet = summary.footprints
    for i, s in enumerate(SPLITS):
        for t in SPLITS[i + 1:]:
            for fa in feet[s]:
                for fb in feet[t]:
                    assert box(*fa).intersection(box(*fb)).area == 0, (s, t)
    # the export replaces an earlier one atomically; a foreign non-empty folder is refused
    assert export_main([str(store), str(files.before), str(files.after), str(out), "--tile-size", str(TILE),
                        "--gsd", str(GSD), "--seed", "1"]) == 0
    assert json.loads((out / "export.json").read_text())["seed"] == 1
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "x.txt").write_text("keep")
    assert export_main([str(store), str(files.before), str(files.after), str(foreign), "--tile-size", "64"]) == 2
    assert [p.name for p in foreign.iterdir()] == ["x.txt"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_training_epoch_on_exported_annotations(annotated, tmp_path):
    files, store, _ = annotated
    out = tmp_path / "dataset"
    summary = export_training_data(store, files.before, files.after, out, tile_size=TILE, gsd=GSD, seed=0)
    try:
        from changescribe.training.datasets.levir import LevirMCIDataset  # noqa: F401
    except ImportError:
        pytest.skip("LEVIR-MCI reader not available yet")
    from changescribe.core.model_loading import load_model
    from changescribe.core.pipeline import detect_changes
    from changescribe.training.config import load_config
    from changescribe.training.recipes.pix4cap import train

    val = next(s for s in ("val", "test", "train") if summary.counts[s])
    cfg = load_config(REPO / "training" / "configs" / "pix4cap_synthetic.json", {
        "data": {"source": "levirmci", "root": str(out), "train_split": "train", "val_split": val},
        "tile_size": TILE, "gsd": GSD, "optim.batch_size": 2, "optim.epochs": 1, "model_name": "annot-test",
        "vocabulary.path": str(SHARED_CAPTIONS)})
    card = train(cfg, tmp_path / "run", device="cpu")
    model = load_model(card)
    assert model.input_spec.tile_size == TILE
    result = detect_changes(files.before, files.after, str(card), tmp_path / "r.gpkg")
    assert result.output.exists() and result.metadata["model"]["name"] == "annot-test"


QGIS_EDIT = textwrap.dedent("""
    import os, signal, sys
    os.environ["QT_QPA_PLATFORM"] = "offscreen"
    from qgis.core import QgsApplication, QgsFeature, QgsGeometry, QgsRectangle, QgsVectorLayer
    app = QgsApplication([], False)
    app.initQgis()
    path, mode = sys.argv[1], sys.argv[2]

    def feature(layer, caption, x):
        f = QgsFeature(layer.fields())
        f.setGeometry(QgsGeometry.fromRect(QgsRectangle(x, 4999900, x + 20, 4999920)))
        f["caption"] = caption
        f["suggested_caption"] = "model says"
        f["edited"] = True
        f["no_change"] = False
        f["change_class"] = "building"
        return f

    def layer():
        lyr = QgsVectorLayer(path + "|layername=annotations", "annotations", "ogr")
        assert lyr.isValid(), "layer not valid"
        return lyr

    if mode == "crash":
        lyr = layer()
        lyr.startEditing()
        assert lyr.addFeature(feature(lyr, "committed", 500000))
        assert lyr.commitChanges(), lyr.commitErrors()
        lyr.startEditing()
        assert lyr.addFeature(feature(lyr, "uncommitted", 500050))
        sys.stdout.write("about to die\\n")
        sys.stdout.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    else:  # two layers on the same file (two projects) edit it alternately
        a, b = layer(), layer()
        for i in range(3):
            for n, lyr in (("a", a), ("b", b)):
                lyr.startEditing()
                assert lyr.addFeature(feature(lyr, f"{n}{i}", 500000 + 30 * i)), n
                assert lyr.commitChanges(), lyr.commitErrors()
        a.reload(); b.reload()
        print("counts", a.featureCount(), b.featureCount())
        del a, b, lyr  # layers go before the application, or exitQgis crashes
    app.exitQgis()
""")


def _run_qgis(tmp_path, *args) -> subprocess.CompletedProcess:
    script = tmp_path / "qgis_edit.py"
    script.write_text(QGIS_EDIT)
    env = dict(os.environ, QT_QPA_PLATFORM="offscreen")
    return subprocess.run([PY, str(script), *args], capture_output=True, text=True, timeout=120, env=env)


def test_qgis_edit_survives_a_crash(tmp_path):
    store = create_store(tmp_path / "s.gpkg", "EPSG:32633")
    proc = _run_qgis(tmp_path, str(store), "crash")
    assert proc.returncode == -9 and "about to die" in proc.stdout, proc.stderr[-2000:]
    assert integrity_ok(store)
    anns = read_annotations(store)
    assert list(anns["caption"]) == ["committed"]
    assert check_store(store) == store


def test_two_qgis_layers_edit_the_same_store(tmp_path):
    store = create_store(tmp_path / "s.gpkg", "EPSG:32633")
    proc = _run_qgis(tmp_path, str(store), "alternate")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "counts 6 6" in proc.stdout
    assert integrity_ok(store)
    assert sorted(read_annotations(store)["caption"]) == sorted(f"{n}{i}" for i in range(3) for n in "ab")


def test_processing_exports_annotations_added_through_a_qgis_edit_buffer(qgis_app, annotated, tmp_path):
    import processing
    from qgis.core import QgsFeature, QgsGeometry, QgsProcessingException, QgsVectorLayer

    files, store, _ = annotated
    copy = tmp_path / "store.gpkg"
    copy.write_bytes(Path(store).read_bytes())  # the module's store stays as the other tests expect it
    layer = QgsVectorLayer(f"{copy}|layername=annotations", "annotations", "ogr")
    assert layer.isValid()
    layer.startEditing()
    f = QgsFeature(layer.fields())
    f.setGeometry(QgsGeometry.fromWkt(_px_box(files, 100, 400, 140, 440).wkt))
    for k, v in annotation_record("a new building appears", "a building", "building").items():
        f[k] = v
    assert layer.addFeature(f) and layer.commitChanges(), layer.commitErrors()
    assert len(read_annotations(copy)) == 6
    out = tmp_path / "exported"
    res = processing.run("changescribe:exporttrainingdata", {
        "ANNOTATIONS": layer, "BEFORE": str(files.before), "AFTER": str(files.after), "TILE_SIZE": TILE,
        "GSD": GSD, "SEED": 0, "OUTPUT": str(out)})
    assert res["CHIPS"] == 6 and Path(res["OUTPUT"]) == out
    data = json.loads((out / CAPTIONS_FILE).read_text())["images"]
    assert "a new building appears" in [r["sentences"][0]["raw"].strip(" .") for r in data]
    with pytest.raises(QgsProcessingException, match="not empty"):
        foreign = tmp_path / "foreign"
        foreign.mkdir()
        (foreign / "keep.txt").write_text("x")
        processing.run("changescribe:exporttrainingdata", {
            "ANNOTATIONS": layer, "BEFORE": str(files.before), "AFTER": str(files.after), "TILE_SIZE": TILE,
            "GSD": GSD, "OUTPUT": str(foreign)})
    del layer


@pytest.mark.skipif(not (Path("/usr/bin/qgis").exists() and __import__("shutil").which("xvfb-run")),
                    reason="needs the QGIS desktop and xvfb-run (make setup installs both)")
def test_dock_annotate_section_in_qgis_desktop(tmp_path):
    from test_dock import run_qgis  # the team's desktop-QGIS driver (tests/ is on sys.path)

    from changescribe.core.model_loading import DEFAULT_MODEL

    r = run_qgis(tmp_path, "annot_dock.py", with_torch=True, timeout=400)
    assert r["collapsed"] and r["created"] and r["tool_active"], r
    assert r["area"] and r["suggestion_started"]
    assert r["suggested"] and r["caption_box"] == r["suggested"], r["suggest_status"]
    assert r["saved1"] and r["saved2"] and r["poly_mode"] == "polygon", (r["status1"], r)
    assert not r["layer_editable_after"]
    first, second = r["stored"]
    assert first["caption"] == "two new houses are built in the middle" and first["edited"]
    assert first["class"] == "building" and not first["no_change"] and first["before"].endswith("annot_before.tif")
    assert first["model"] == DEFAULT_MODEL and first["area"] > 0  # the dock suggests with the default model
    assert second["no_change"] and second["caption"] == "there is no difference" and second["class"] is None
    assert r["export_params"]["ANNOTATIONS"] == "QgsVectorLayer"
    assert not r["ro_opened"] and "read-only" in r["ro_status"]
    assert r["tool_released"]
