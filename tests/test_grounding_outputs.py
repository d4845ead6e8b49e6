"""Grounded captions everywhere (issue 18): the fields in a real CLI run's GeoPackage, in Processing's output layer,
and flagged rows marked in the dock's regions table."""

from __future__ import annotations

import sqlite3
import subprocess
import sys

import geopandas as gpd
import pytest
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
    assert (f"{flagged} decoder caption" in scene) == (flagged > 0)
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
