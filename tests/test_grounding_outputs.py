"""Grounded captions everywhere (issue 18): the fields in a real CLI run's GeoPackage, in Processing's output layer,
and flagged rows marked in the dock's regions table."""

from __future__ import annotations

import dataclasses
import sqlite3
import subprocess
import sys

import geopandas as gpd
import pytest
import rasterio
from shapely.geometry import box

from changescribe.core.geopackage import REGION_FIELDS, RegionWriter, write_captions
from changescribe.core.grounding import CHANGE_TYPES, FACT_FIELDS, GroundedRegion
from changescribe.training.synthetic import write_pair

MODEL = "pix4cap-synthetic"  # small and fast; captions from a decoder trained on generated scenes


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return write_pair(tmp_path_factory.mktemp("grounded"), "g", size=192, seed=7_000_003, change_level=0.9)


def _check_fields(rows: list[dict]) -> None:
    assert rows
    for row in rows:
        assert set(FACT_FIELDS) <= set(row)
        assert row["change_type"] in CHANGE_TYPES and 0 <= row["type_confidence"] <= 1
        assert row["shape"] in ("compact", "elongated", "linear") and row["objects"] >= 1
        assert row["position"].endswith("of the scene") and row["greenness_index"] == "ExG"
        assert row["caption"].endswith(f"in the {row['position']}")  # built from the facts
        assert row["model_caption"] and row["caption_flag"] is not None
        assert "corner" not in row["model_caption"] or row["position"] in row["model_caption"]


@pytest.mark.timeout(2400)
def test_cli_run_writes_facts_type_captions_and_flags(tmp_path, pair):
    out = tmp_path / "cli.gpkg"
    done = subprocess.run([sys.executable, "-m", "changescribe", "detect", str(pair.before), str(pair.after),
                           "-o", str(out), "--model", MODEL, "--device", "cpu", "--min-area", "4"],
                          capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr
    con = sqlite3.connect(out)
    con.row_factory = sqlite3.Row
    try:
        names = [r[1] for r in con.execute("PRAGMA table_info(change_regions)")]
        rows = [dict(r) for r in con.execute("SELECT * FROM change_regions")]
        scene = con.execute("SELECT scene_caption FROM changescribe_runs").fetchone()[0]
    finally:
        con.close()
    # the old fields keep their order; the new ones come after them
    assert names[names.index("region_id"):] == list(REGION_FIELDS)
    _check_fields(rows)
    assert f"scene caption: {scene}" in done.stdout
    flagged = sum(1 for r in rows if r["caption_flag"])
    assert flagged > 0  # this pair's decoder contradicts some facts: the count below is not trivially 0
    assert (f"{flagged} decoder caption" in scene) == (flagged > 0)
    assert f"change regions: {len(rows)} (" in done.stdout and f"; flagged captions: {flagged}\n" in done.stdout
    biggest = max(rows, key=lambda r: r["area_m2"])["change_type"]
    assert biggest.split()[0] in scene or "other change" in scene


@pytest.mark.timeout(2400)  # one 192² tile, but a loaded 2-core machine can take minutes
def test_processing_output_has_the_fields_and_counts_flags(qgis_app, tmp_path, pair):
    import processing
    from qgis.core import QgsVectorLayer

    out = tmp_path / "p.gpkg"
    result = processing.run("changescribe:detectchanges", {
        "BEFORE": str(pair.before), "AFTER": str(pair.after), "MODEL": MODEL, "MIN_AREA": 4.0,
        "DEVICE": "cpu", "OUTPUT": str(out)})
    layer = QgsVectorLayer(result["OUTPUT"], "r", "ogr")
    assert layer.isValid()
    names = layer.fields().names()
    rows = [{n: f[n] for n in names} for f in layer.getFeatures()]
    del layer
    _check_fields(rows)
    assert result["FLAGGED_COUNT"] == sum(1 for r in rows if r["caption_flag"])


def test_dock_table_marks_flagged_rows(qgis_app, tmp_path):
    from qgis.core import QgsVectorLayer
    from qgis.gui import QgsMapCanvas

    from changescribe.plugin.dock_widgets_results import FLAG_MARK, FLAG_ROLE, RegionsTable

    gpkg = tmp_path / "flags.gpkg"
    frame = gpd.GeoDataFrame({"region_id": [1, 2], "area_m2": [900.0, 100.0], "mean_prob": [0.9, 0.8],
                              "max_prob": [0.95, 0.9], "shape": ["compact", "compact"]},
                             geometry=[box(0, 0, 30, 30), box(50, 50, 60, 60)], crs="EPSG:32633")
    with RegionWriter(gpkg, frame.crs.to_wkt()) as writer:
        writer.append(frame)
    write_captions(gpkg, [
        (1, 1, GroundedRegion("new building", 0.8, "new building, about 900 m², compact, in the centre",
                              "a road is built in the centre of the scene", "names a road or path on a compact region")),
        (2, 1, GroundedRegion("new building", 0.7, "new building, about 100 m², compact, in the north",
                              "a house is built in the north part of the scene", ""))])
    layer = QgsVectorLayer(f"{gpkg}|layername=change_regions", "r", "ogr")
    canvas = QgsMapCanvas()
    table = RegionsTable(canvas)
    table.set_layer(layer)
    assert table.rowCount() == 2
    flagged, plain = table.item(0, 3), table.item(1, 3)  # largest first
    assert flagged.text() == FLAG_MARK + "new building, about 900 m², compact, in the centre"
    assert flagged.data(FLAG_ROLE) == "names a road or path on a compact region"
    assert "Flagged: names a road" in flagged.toolTip() and "Decoder: a road is built" in flagged.toolTip()
    assert table.item(0, 0).data(FLAG_ROLE) and table.item(0, 0).background().color().isValid()
    assert not plain.text().startswith(FLAG_MARK) and plain.data(FLAG_ROLE) is None
    assert "Decoder: a house is built" in plain.toolTip()
    table.set_layer(None)
    del layer, table, canvas


# --- given areas (Caption regions) are grounded as detected regions are -------------------------------------


def _areas(bounds) -> dict:
    """Polygons of the grid: a square in the north-west corner, a strip along the middle, one reaching past the
    east edge (only its part in the grid counts) and one outside."""
    left, bottom, right, top = bounds
    w, h = right - left, top - bottom
    return {"north-west": box(left + 4, top - 0.3 * h, left + 0.3 * w, top - 4),
            "middle": box(left + 0.1 * w, bottom + 0.4 * h, right - 0.1 * w, bottom + 0.6 * h),
            "east edge": box(right - 0.2 * w, bottom + 0.4 * h, right + 50, bottom + 0.6 * h),
            "outside": box(right + 100, bottom, right + 200, bottom + 50)}


@pytest.mark.timeout(2400)
def test_caption_areas_grounds_areas_with_a_whole_run_s_probabilities(tmp_path, pair):
    from changescribe.core.captioning import AREA_FIELDS, caption_areas, decoder_captions, in_scene
    from changescribe.core.grounding import NO_CHANGE, ground_region, is_no_change, measure_regions, region_facts
    from changescribe.core.inference import predict_probability
    from changescribe.core.model_loading import load_model
    from changescribe.core.raster_pair import AlignedPair
    from changescribe.core.regions import region_statistics

    model = load_model(MODEL)
    with AlignedPair(str(pair.before), str(pair.after), bands=model.input_spec.bands) as grid_pair:
        areas = _areas(grid_pair.grid.bounds)
        got = dict(zip(areas, caption_areas(grid_pair, model, list(areas.values()) + [None], beam_size=1)))
        # the detect run's own code on the whole grid's probability map gives the same facts and probabilities
        whole = tmp_path / "whole.tif"
        predict_probability(grid_pair, model, whole)
        inside = {name: in_scene(grid_pair, g) for name, g in areas.items() if name != "outside"}
        pixels = dict(zip(inside, measure_regions(grid_pair, whole, list(inside.values()), 0.5)))
        means, maxes = region_statistics(whole, list(inside.values()))
        sentences = dict(zip(inside, decoder_captions(grid_pair, model, [g.bounds for g in inside.values()])))
    assert got["outside"] is None
    assert inside["east edge"].bounds[2] == pytest.approx(grid_pair.grid.bounds[2])  # clipped to the grid
    for (name, geom), mean, peak in zip(inside.items(), means, maxes):
        area = got[name]
        assert area.mean_prob == pytest.approx(mean, abs=1e-5) and area.max_prob == pytest.approx(peak, abs=1e-5)
        assert area.facts.pixels == pixels[name]
        assert area.area_m2 == pytest.approx(geom.area)
        assert area.grounded == ground_region(sentences[name], area.facts)  # the detect run's grounding
        record = area.record()
        assert list(record) == list(AREA_FIELDS)
        assert record["caption"] == area.grounded.caption and record["model_caption"] == area.grounded.model_caption
    assert got["north-west"].facts.position == "north-west part of the scene"
    assert got["middle"].facts.position == "centre of the scene" and got["middle"].facts.shape == "elongated"
    assert got["east edge"].facts.position == "east part of the scene"
    # the model reports change in some areas and none in others (change_level 0.9 on this pair)
    changed = [a for a in got.values() if a is not None and a.max_prob >= 0.5]
    unchanged = [a for a in got.values() if a is not None and a.max_prob < 0.5]
    assert changed and unchanged
    for a in changed:
        assert a.facts.objects >= 1 and a.grounded.change_type != NO_CHANGE
    for a in unchanged:  # no type is guessed from the pixels of ground the model saw unchanged
        g = a.grounded
        assert a.facts.objects == 0 and g.change_type == NO_CHANGE and g.caption.startswith("no change detected")
        said_change = not is_no_change(g.model_caption)
        assert (g.caption_flag == "describes a change but the model's change mask has no pixel in the area") \
            == said_change
    # facts the other way round: a sentence of change on an unchanged area is flagged, "no change" is not
    facts = unchanged[0].facts
    assert ground_region("a house is built", facts).caption_flag.startswith("describes a change")
    assert ground_region("the scene is the same as before", facts).caption_flag == ""
    assert ground_region("the scene is the same as before", changed[0].facts).caption_flag.startswith(
        "no-change sentence on a region reported as changed")
    assert region_facts(inside["middle"], 1.0, grid_pair.grid.bounds, None).changed  # a detected region's default


def test_caption_areas_with_a_captioner_that_cannot_detect(tmp_path, pair):
    """A captioner without a change head (SEN, untrained and tiny): the facts come from the pixels alone, no
    probability, no objects, and no flag that presumes the model reported change."""
    import torch

    from changescribe.core.captioning import caption_areas
    from changescribe.core.grounding import CHANGE_TYPES, measure_regions
    from changescribe.core.model_api import InputSpec
    from changescribe.core.models.adapter import TorchChangeModel
    from changescribe.core.models.registry import build_model, get_entry
    from changescribe.core.raster_pair import AlignedPair
    from changescribe.core.vocabulary import Vocabulary

    torch.manual_seed(0)
    vocab = Vocabulary.build(["a house is built", "the scene is the same as before", "trees are removed"],
                             min_count=1, max_length=8)
    cfg = dataclasses.replace(get_entry("sen").config, d_model=64, ffn_dim=128, heads=4)
    module, _ = build_model("sen", cfg, vocabulary=vocab)
    model = TorchChangeModel(module, InputSpec(tile_size=64), vocab, name="sen-tiny")
    assert model.can_caption and not model.can_detect
    with AlignedPair(str(pair.before), str(pair.after), bands=3) as grid_pair:
        areas = _areas(grid_pair.grid.bounds)
        got = caption_areas(grid_pair, model, [areas["north-west"], areas["middle"]], beam_size=1)
        alone = measure_regions(grid_pair, None, [areas["north-west"], areas["middle"]], 0.5)
    for area, px in zip(got, alone):
        assert area.mean_prob is None and area.max_prob is None and area.facts.pixels == px
        assert area.facts.objects is None and area.facts.changed is None and area.record()["objects"] is None
        assert px.greenness_index == "ExG" and area.record()["greenness_change"] is not None
        assert area.grounded.change_type in CHANGE_TYPES
        assert not area.grounded.caption_flag.startswith(("no-change sentence", "describes a change"))


@pytest.mark.timeout(2400)
def test_processing_caption_regions_writes_the_grounded_fields(qgis_app, tmp_path, pair):
    import processing
    from qgis.core import NULL, QgsFeature, QgsGeometry, QgsVectorLayer

    from changescribe.core.captioning import AREA_FIELDS, caption_areas
    from changescribe.core.model_loading import load_model
    from changescribe.core.raster_pair import AlignedPair

    with rasterio.open(pair.before) as src:
        areas = _areas(tuple(src.bounds))
        crs = src.crs.to_string()
    layer = QgsVectorLayer(f"Polygon?crs={crs}&field=name:string", "drawn", "memory")
    feats = []
    for name, geom in areas.items():
        f = QgsFeature(layer.fields())
        f.setAttributes([name])
        f.setGeometry(QgsGeometry.fromWkt(geom.wkt))
        feats.append(f)
    assert layer.dataProvider().addFeatures(feats)[0]
    res = processing.run("changescribe:captionregions", {
        "BEFORE": str(pair.before), "AFTER": str(pair.after), "REGIONS": layer, "MODEL": MODEL, "DEVICE": "cpu",
        "BEAM_SIZE": 1, "OUTPUT": str(tmp_path / "areas.gpkg")})
    out = QgsVectorLayer(res["OUTPUT"], "a", "ogr")
    assert out.isValid()
    names = out.fields().names()
    assert names[-len(AREA_FIELDS):] == list(AREA_FIELDS)  # the names of a detected region's fields
    rows = {f["name"]: {n: f[n] for n in AREA_FIELDS} for f in out.getFeatures()}
    del out
    assert all(v == NULL for v in rows.pop("outside").values())
    model = load_model(MODEL)
    with AlignedPair(str(pair.before), str(pair.after), bands=model.input_spec.bands) as grid_pair:
        want = caption_areas(grid_pair, model, [areas[n] for n in rows], beam_size=1)
    for (name, row), area in zip(rows.items(), want):  # what core says, field for field
        expected = area.record()
        for field, value in row.items():
            if isinstance(value, float):
                assert value == pytest.approx(expected[field], abs=1e-6), (name, field)
            else:
                assert value == expected[field], (name, field)
    assert res["FLAGGED_COUNT"] == sum(1 for r in rows.values() if r["caption_flag"])
    assert any(r["change_type"] == "no change" for r in rows.values())
    assert any(r["change_type"] != "no change" and r["objects"] >= 1 for r in rows.values())
