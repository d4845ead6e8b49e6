"""changescribe:detectchanges through QGIS's Processing: in-process, a batch, bad input, and qgis_process."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from changescribe.core.synthetic import write_pair

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "resources" / "sample"


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    root = tmp_path_factory.mktemp("pairs")
    return [write_pair(root, f"p{i}", size=256, seed=8_000_000 + i, change_level=0.8,
                       after_crs="EPSG:3857" if i == 1 else None) for i in range(3)]


def test_processing_run_in_process(qgis_app, tmp_path):
    import processing
    from qgis.core import QgsVectorLayer

    out = tmp_path / "regions.gpkg"
    result = processing.run("changescribe:detectchanges", {
        "BEFORE": str(SAMPLE / "sample_before.tif"), "AFTER": str(SAMPLE / "sample_after.tif"),
        "MIN_AREA": 10.0, "OUTPUT": str(out)})
    assert result["OUTPUT"] == f"{out}|layername=change_regions"
    assert isinstance(result["CAPTION"], str) and result["CAPTION"]
    layer = QgsVectorLayer(result["OUTPUT"], "r", "ogr")
    assert layer.isValid() and layer.featureCount() == result["REGION_COUNT"] > 0
    del layer


def test_processing_batch_of_three_pairs_in_two_crs(qgis_app, tmp_path, pairs):
    import processing

    counts = []
    for i, p in enumerate(pairs):
        res = processing.run("changescribe:detectchanges", {"BEFORE": str(p.before), "AFTER": str(p.after),
                                                            "OUTPUT": str(tmp_path / f"r{i}.gpkg")})
        counts.append(res["REGION_COUNT"])
        assert (tmp_path / f"r{i}.gpkg").exists()
    assert all(c > 0 for c in counts)


def test_processing_bad_input_raises_clear_error(qgis_app, tmp_path):
    import processing
    from qgis.core import QgsProcessingException

    bad = tmp_path / "not_a_raster.tif"
    bad.write_text("nonsense")
    with pytest.raises(QgsProcessingException):
        processing.run("changescribe:detectchanges", {"BEFORE": str(SAMPLE / "sample_before.tif"),
                                                      "AFTER": str(bad), "OUTPUT": str(tmp_path / "r.gpkg")})
    assert not (tmp_path / "r.gpkg").exists()


def test_processing_model_error_is_a_processing_exception(qgis_app, tmp_path):
    import processing
    from qgis.core import QgsProcessingException

    with pytest.raises(QgsProcessingException, match="no-such-model"):
        processing.run("changescribe:detectchanges", {
            "BEFORE": str(SAMPLE / "sample_before.tif"), "AFTER": str(SAMPLE / "sample_after.tif"),
            "MODEL": "no-such-model", "OUTPUT": str(tmp_path / "r.gpkg")})
    assert not (tmp_path / "r.gpkg").exists()


def test_qgis_process_headless_json(tmp_path):
    out = tmp_path / "qp.gpkg"
    proc = subprocess.run([str(REPO / "scripts" / "qgis_process.sh"), "run", "changescribe:detectchanges", "--json",
                           "--", f"BEFORE={SAMPLE / 'sample_before.tif'}", f"AFTER={SAMPLE / 'sample_after.tif'}",
                           "MIN_AREA=10", f"OUTPUT={out}"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    payload = json.loads(proc.stdout[proc.stdout.index("{"):])
    results = payload["results"]
    assert results["OUTPUT"].startswith(str(out)) and out.exists()
    assert results["REGION_COUNT"] > 0 and results["CAPTION"]


def test_run_and_load_results_styles_the_layer(qgis_app, tmp_path):
    import processing
    from qgis.core import QgsGraduatedSymbolRenderer, QgsProject

    project = QgsProject.instance()
    project.clear()
    processing.runAndLoadResults("changescribe:detectchanges", {
        "BEFORE": str(SAMPLE / "sample_before.tif"), "AFTER": str(SAMPLE / "sample_after.tif"),
        "MIN_AREA": 10.0, "OUTPUT": str(tmp_path / "styled.gpkg")})
    layers = [lyr for lyr in project.mapLayers().values() if "styled.gpkg" in lyr.source()]
    assert len(layers) == 1
    layer = layers[0]
    assert "layername=change_regions" in layer.source()
    assert isinstance(layer.renderer(), QgsGraduatedSymbolRenderer)
    assert layer.renderer().classAttribute() == "mean_prob"
    assert "caption" in layer.mapTipTemplate()
    assert layer.abstract()
    project.clear()
