"""ChangeScribe's Processing provider through QGIS's own machinery: processing.run, the batch dialog's way of
running, the toolbox's background task, the graphical modeler and headless qgis_process.

Models are stand-ins until the trained default lands: tests check structure (fields, files, CRSs, where regions
lie), never what a caption says. Where regions must exist, THRESHOLD is LOW so any model reports change.
"""

from __future__ import annotations

import html
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from shapely import wkt as shapely_wkt
from shapely.geometry import box

from changescribe.core.captioning import AREA_FIELDS
from changescribe.training.synthetic import write_pair

REPO = Path(__file__).resolve().parent.parent
LOW = 0.01  # every model (even an untrained stand-in) reports change somewhere at this threshold
DATA_URI = '<img src="data:image/png;base64,'
TOLERANCE_M = 1.0  # pixel-centre masking + simplification may reach half a pixel (0.25 m) past an AOI edge


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    root = tmp_path_factory.mktemp("pairs")
    return [write_pair(root, f"p{i}", size=256, seed=8_000_000 + i, change_level=0.8,
                       after_crs="EPSG:3857" if i == 1 else None) for i in range(3)]


def regions_of(uri: str) -> list:
    """Shapely geometries and attributes of a result layer, read through QGIS."""
    from qgis.core import QgsVectorLayer

    layer = QgsVectorLayer(uri, "r", "ogr")
    assert layer.isValid(), uri
    out = [(shapely_wkt.loads(f.geometry().asWkt()), f.attributes()) for f in layer.getFeatures()]
    del layer
    return out


def pair_bounds(path) -> tuple[float, float, float, float]:
    import rasterio

    with rasterio.open(path) as src:
        return tuple(src.bounds)


# --- detectchanges -----------------------------------------------------------------------------------------


def test_processing_run_in_process_with_report_and_probability(qgis_app, tmp_path, sample):
    import processing
    import rasterio

    before, after = sample
    out, prob, report = tmp_path / "regions.gpkg", tmp_path / "prob.tif", tmp_path / "report.html"
    result = processing.run("changescribe:detectchanges", {
        "BEFORE": before, "AFTER": after, "MIN_AREA": 10.0, "OUTPUT": str(out), "OUTPUT_PROBABILITY": str(prob),
        "REPORT": str(report)})
    assert result["OUTPUT"] == f"{out}|layername=change_regions"
    assert isinstance(result["CAPTION"], str) and result["CAPTION"]
    regions = regions_of(result["OUTPUT"])
    assert len(regions) == result["REGION_COUNT"]
    assert all(geom.area >= 10.0 - 1e-6 for geom, _ in regions)
    assert result["OUTPUT_PROBABILITY"] == str(prob)
    with rasterio.open(prob) as src, rasterio.open(before) as b:
        assert (src.crs, src.transform, src.shape) == (b.crs, b.transform, b.shape)
    assert result["REPORT"] == str(report)
    text = report.read_text(encoding="utf-8")
    assert text.count(DATA_URI) == 3
    assert html.escape(result["CAPTION"]) in text
    assert text.count("<tr><td class=\"num\">") == result["REGION_COUNT"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prob.tif", "regions.gpkg", "report.html"]


def test_processing_batch_of_three_pairs_in_two_crs(qgis_app, tmp_path, pairs):
    """Rows 1–2 run as 3.22's batch dialog runs them (one algorithm, a multi-step feedback, a fresh context per
    row, alg.run); row 3 as the toolbox runs a dialog: QgsProcessingAlgRunnerTask on the task manager."""
    from qgis.core import (QgsApplication, QgsProcessingAlgRunnerTask, QgsProcessingContext, QgsProcessingFeedback,
                           QgsProcessingMultiStepFeedback)

    alg = QgsApplication.processingRegistry().createAlgorithmById("changescribe:detectchanges")
    assert alg.flags() & alg.FlagSupportsBatch
    rows = [{"BEFORE": str(p.before), "AFTER": str(p.after), "THRESHOLD": LOW, "CAPTIONS": False,
             "OUTPUT": str(tmp_path / f"r{i}.gpkg")} for i, p in enumerate(pairs)]
    feedback = QgsProcessingFeedback()
    multi = QgsProcessingMultiStepFeedback(len(rows), feedback)
    counts = []
    for i, row in enumerate(rows[:2]):
        multi.setCurrentStep(i)
        results, ok = alg.run(alg.preprocessParameters(row), QgsProcessingContext(), multi)
        assert ok, i
        counts.append(results["REGION_COUNT"])

    context = QgsProcessingContext()
    task_feedback = QgsProcessingFeedback()
    task = QgsProcessingAlgRunnerTask(alg, rows[2], context, task_feedback)
    done = {}
    task.executed.connect(lambda ok, res: done.update(ok=ok, results=res))
    QgsApplication.taskManager().addTask(task)
    deadline = time.monotonic() + 300
    while "ok" not in done and time.monotonic() < deadline:
        QgsApplication.processEvents()
        time.sleep(0.02)
    assert done.get("ok") is True, task_feedback.textLog()[-2000:]
    counts.append(done["results"]["REGION_COUNT"])

    assert all(c > 0 for c in counts)
    assert all((tmp_path / f"r{i}.gpkg").exists() for i in range(3))
    # Results are on each before raster's grid, also for the pair whose after raster is in EPSG:3857.
    geom, _ = regions_of(f"{tmp_path / 'r1.gpkg'}|layername=change_regions")[0]
    assert box(*pair_bounds(pairs[1].before)).buffer(TOLERANCE_M).contains(geom)


def test_extent_in_another_crs_limits_the_regions(qgis_app, tmp_path, pairs):
    import processing
    from pyproj import Transformer

    left, bottom, right, top = pair_bounds(pairs[0].before)
    inner = (left + 20, bottom + 30, left + 70, bottom + 90)  # a 50 m × 60 m box in EPSG:32633
    to_merc = Transformer.from_crs("EPSG:32633", "EPSG:3857", always_xy=True)
    xs, ys = to_merc.transform([inner[0], inner[2]], [inner[1], inner[3]])
    extent = f"{xs[0]},{xs[1]},{ys[0]},{ys[1]} [EPSG:3857]"
    res = processing.run("changescribe:detectchanges", {
        "BEFORE": str(pairs[0].before), "AFTER": str(pairs[0].after), "THRESHOLD": LOW, "EXTENT": extent,
        "CAPTIONS": False, "OUTPUT": str(tmp_path / "extent.gpkg")})
    regions = regions_of(res["OUTPUT"])
    assert res["REGION_COUNT"] == len(regions) > 0
    # The extent's box reprojected back to EPSG:32633 is slightly curved: compare with a generous margin.
    allowed = box(*inner).buffer(TOLERANCE_M + 0.5)
    assert all(allowed.contains(geom) for geom, _ in regions)
    assert sum(geom.area for geom, _ in regions) <= allowed.area


def test_mask_uses_selected_polygons_only(qgis_app, tmp_path, pairs):
    import processing
    from pyproj import Transformer
    from qgis.core import QgsFeature, QgsGeometry, QgsVectorLayer

    left, bottom, right, top = pair_bounds(pairs[2].before)
    wanted = box(left + 10, bottom + 10, left + 50, bottom + 40).union(box(left + 30, bottom + 30, left + 60,
                                                                             bottom + 60))
    ignored = box(right - 50, top - 50, right - 10, top - 10)
    to_merc = Transformer.from_crs("EPSG:32633", "EPSG:3857", always_xy=True)
    layer = QgsVectorLayer("Polygon?crs=EPSG:3857&field=name:string", "mask", "memory")
    feats = []
    for name, geom in (("wanted", wanted), ("ignored", ignored)):
        f = QgsFeature(layer.fields())
        ring = [to_merc.transform(x, y) for x, y in geom.exterior.coords]
        f.setGeometry(QgsGeometry.fromWkt("POLYGON((" + ", ".join(f"{x} {y}" for x, y in ring) + "))"))
        f.setAttributes([name])
        feats.append(f)
    assert layer.dataProvider().addFeatures(feats)[0]
    layer.selectByExpression("name = 'wanted'")
    assert layer.selectedFeatureCount() == 1
    res = processing.run("changescribe:detectchanges", {
        "BEFORE": str(pairs[2].before), "AFTER": str(pairs[2].after), "THRESHOLD": LOW, "MASK": layer,
        "CAPTIONS": False, "OUTPUT": str(tmp_path / "mask.gpkg")})
    regions = regions_of(res["OUTPUT"])
    assert res["REGION_COUNT"] == len(regions) > 0
    allowed = wanted.buffer(TOLERANCE_M)
    assert all(allowed.contains(geom) for geom, _ in regions)
    assert not any(geom.intersects(ignored) for geom, _ in regions)


def test_processing_bad_input_raises_clear_error(qgis_app, tmp_path, sample):
    import processing
    from qgis.core import QgsProcessingException

    before = sample[0]
    bad = tmp_path / "not_a_raster.tif"
    bad.write_text("nonsense")
    with pytest.raises(QgsProcessingException, match="AFTER.*not_a_raster.tif"):
        processing.run("changescribe:detectchanges", {"BEFORE": before, "AFTER": str(bad),
                                                      "OUTPUT": str(tmp_path / "r.gpkg"),
                                                      "REPORT": str(tmp_path / "r.html")})
    with pytest.raises(QgsProcessingException, match="AFTER.*not_a_raster.tif"):
        processing.run("changescribe:captionregions", {"BEFORE": before, "AFTER": str(bad),
                                                       "REGIONS": regions_layer(Path(before)),
                                                       "OUTPUT": str(tmp_path / "c.gpkg")})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["not_a_raster.tif"]


@pytest.mark.parametrize("params, message", [
    ({"MODEL": "no-such-model"}, "no installed model is named 'no-such-model'"),
    ({"MODEL_FILE": "/nonexistent/folder/model.json"}, "/nonexistent/folder/model.json"),
    ({"MODEL_FILE": "/nonexistent/folder/weights.pt"}, "pickled checkpoints are refused"),
    ({"DEVICE": "tpu"}, "DEVICE"),
    ({"OUTPUT": "{tmp}/regions.shp"}, r"GeoPackage \(\.gpkg\)"),
    ({"REPORT": "{tmp}/report.txt"}, r"HTML file \(\.html\)"),
    ({"EXTENT": "100,200,100,200 [EPSG:32633]"}, "does not overlap"),
])
def test_processing_bad_parameters_give_clear_messages_and_no_files(qgis_app, tmp_path, sample, params, message):
    import processing
    from qgis.core import QgsProcessingException

    before, after = sample
    base = {"BEFORE": before, "AFTER": after, "OUTPUT": str(tmp_path / "r.gpkg"), "REPORT": str(tmp_path / "r.html")}
    base.update({k: v.format(tmp=tmp_path) if isinstance(v, str) else v for k, v in params.items()})
    with pytest.raises(QgsProcessingException, match=message):
        processing.run("changescribe:detectchanges", base)
    assert list(tmp_path.iterdir()) == []


def test_model_and_device_by_name_index_or_file(qgis_app, tmp_path, pairs):
    """Names are what the modeler and batch files store; indices are what 3.22's qgis_process help suggests;
    MODEL_FILE overrides MODEL."""
    import processing
    from qgis.core import QgsVectorLayer

    from changescribe.core.model_loading import installed_models

    card = next(c for c in installed_models() if c["name"] == "pix4cap-synthetic")["path"]
    left, bottom, _, _ = pair_bounds(pairs[0].before)
    common = {"BEFORE": str(pairs[0].before), "AFTER": str(pairs[0].after), "THRESHOLD": LOW, "CAPTIONS": False,
              "EXTENT": f"{left},{left + 40},{bottom},{bottom + 40} [EPSG:32633]"}
    names = [c["name"] for c in installed_models()]  # the MODEL enum's options, in this order
    for i, choice in enumerate([{"MODEL": "pix4cap-synthetic", "DEVICE": "cpu"},
                                {"MODEL": names.index("pix4cap-synthetic"), "DEVICE": "1"},
                                {"MODEL": "not-installed", "MODEL_FILE": card, "DEVICE": "auto"}]):
        res = processing.run("changescribe:detectchanges", {**common, **choice, "OUTPUT": str(tmp_path / f"{i}.gpkg")})
        layer = QgsVectorLayer(res["OUTPUT"], "r", "ogr")
        assert {f["model_name"] for f in layer.getFeatures()} == {"pix4cap-synthetic"}, choice
        del layer


def cancelling_feedback():
    """A feedback that cancels itself as soon as the algorithm reports progress."""
    from qgis.core import QgsProcessingFeedback

    feedback = QgsProcessingFeedback()
    reports = []

    def cancel(progress):
        reports.append(progress)
        feedback.cancel()

    feedback.progressChanged.connect(cancel)
    return feedback, reports


def test_cancel_raises_and_writes_nothing(qgis_app, tmp_path, pairs):
    import processing
    from qgis.core import QgsProcessingException

    feedback, reports = cancelling_feedback()
    with pytest.raises(QgsProcessingException, match="cancel"):
        processing.run("changescribe:detectchanges", {
            "BEFORE": str(pairs[0].before), "AFTER": str(pairs[0].after), "OUTPUT": str(tmp_path / "r.gpkg"),
            "OUTPUT_PROBABILITY": str(tmp_path / "p.tif"), "REPORT": str(tmp_path / "r.html")}, feedback=feedback)
    assert reports and feedback.isCanceled()
    assert list(tmp_path.iterdir()) == []


def test_a_failed_report_leaves_no_outputs(qgis_app, tmp_path, pairs, monkeypatch):
    import processing
    from qgis.core import QgsProcessingException

    import changescribe.core.report as report

    def fail(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(report, "write_report", fail)
    left, bottom, _, _ = pair_bounds(pairs[0].before)
    with pytest.raises(QgsProcessingException, match="cannot write the report .*No space left"):
        processing.run("changescribe:detectchanges", {
            "BEFORE": str(pairs[0].before), "AFTER": str(pairs[0].after), "CAPTIONS": False,
            "EXTENT": f"{left},{left + 30},{bottom},{bottom + 30} [EPSG:32633]", "OUTPUT": str(tmp_path / "r.gpkg"),
            "OUTPUT_PROBABILITY": str(tmp_path / "p.tif"), "REPORT": str(tmp_path / "r.html")})
    assert list(tmp_path.iterdir()) == []


def test_algorithms_document_every_parameter(qgis_app):
    from qgis.core import QgsApplication

    registry = QgsApplication.processingRegistry()
    algs = {a.id() for a in registry.providerById("changescribe").algorithms()}
    assert algs == {"changescribe:detectchanges", "changescribe:captionregions", "changescribe:exporttrainingdata",
                    "changescribe:importcheckpoint", "changescribe:detectchangesbatch"}
    for alg_id in algs:
        alg = registry.algorithmById(alg_id)
        assert len(alg.shortHelpString()) > 100
        assert alg.flags() & alg.FlagCanCancel
        for param in alg.parameterDefinitions():
            assert param.help(), f"{alg_id}: {param.name()} has no help"
        model = alg.parameterDefinition("MODEL")
        if model is None:  # exporttrainingdata: tile size and GSD default to the default model's
            continue
        assert model.usesStaticStrings() and model.defaultValue() == "pix4cap-lite-real"
        assert {"pix4cap-lite-real", "pix4cap-synthetic"} <= set(model.options())
    # both algorithms decode with the model's own beam size unless told otherwise (0)
    beams = {a: registry.algorithmById(f"changescribe:{a}").parameterDefinition("BEAM_SIZE").defaultValue()
             for a in ("detectchanges", "captionregions")}
    assert beams == {"detectchanges": 0, "captionregions": 0}


# --- captionregions ----------------------------------------------------------------------------------------


def regions_layer(pair_before: Path, crs: str = "EPSG:4326"):
    """A memory layer in another CRS: two polygons on the pair, one far away, one without geometry."""
    from pyproj import Transformer
    from qgis.core import QgsFeature, QgsGeometry, QgsVectorLayer

    left, bottom, right, top = pair_bounds(pair_before)
    to_crs = Transformer.from_crs("EPSG:32633", crs, always_xy=True)

    def polygon(l, b, r, t):
        ring = [to_crs.transform(x, y) for x, y in ((l, b), (r, b), (r, t), (l, t), (l, b))]
        return QgsGeometry.fromWkt("POLYGON((" + ", ".join(f"{x!r} {y!r}" for x, y in ring) + "))")

    layer = QgsVectorLayer(f"Polygon?crs={crs}&field=name:string&field=score:integer", "drawn", "memory")
    rows = [("small", 7, polygon(left + 10, bottom + 10, left + 25, bottom + 20)),
            ("large", 42, polygon(left + 40, bottom + 40, right - 10, top - 10)),
            ("far away", 0, polygon(left + 50_000, bottom, left + 50_100, bottom + 100)),
            ("no geometry", -1, None)]
    feats = []
    for name, score, geom in rows:
        f = QgsFeature(layer.fields())
        f.setAttributes([name, score])
        if geom is not None:
            f.setGeometry(geom)
        feats.append(f)
    assert layer.dataProvider().addFeatures(feats)[0]
    return layer


def test_captionregions_adds_a_caption_to_every_feature(qgis_app, tmp_path, pairs):
    import processing
    from qgis.core import NULL, QgsVectorLayer

    source = regions_layer(pairs[1].before)  # pair 1: the after raster is in EPSG:3857, the regions in 4326
    out = tmp_path / "captioned.gpkg"
    res = processing.run("changescribe:captionregions", {
        "BEFORE": str(pairs[1].before), "AFTER": str(pairs[1].after), "REGIONS": source, "BEAM_SIZE": 1,
        "OUTPUT": str(out)})
    layer = QgsVectorLayer(res["OUTPUT"], "c", "ogr")
    assert layer.isValid()
    names = [f.name() for f in layer.fields()]
    assert names[-len(AREA_FIELDS) - 2:] == ["name", "score", *AREA_FIELDS]  # a detected region's fields
    assert layer.crs().authid() == "EPSG:4326"
    got = {f["name"]: f for f in layer.getFeatures()}
    want = {f["name"]: f for f in source.getFeatures()}
    assert set(got) == set(want)
    for name, f in want.items():
        assert got[name]["score"] == f["score"]
        if f.hasGeometry():  # unchanged, in the layer's own CRS
            assert got[name].geometry().equals(f.geometry())
        else:  # QGIS 3.22's GeoPackage writer stores a missing geometry as an empty one
            assert got[name].geometry().isEmpty()
    for name in ("small", "large"):
        assert isinstance(got[name]["caption"], str) and got[name]["caption"].strip()
    for name in ("far away", "no geometry"):
        assert all(got[name][field] == NULL for field in AREA_FIELDS)
    del layer


def test_captionregions_refuses_a_model_that_cannot_caption(qgis_app, tmp_path, pairs):
    import processing
    from qgis.core import QgsProcessingException

    from changescribe.core.model_api import InputSpec
    from changescribe.core.model_file import save_model_file
    from changescribe.core.models.registry import build_model

    module, cfg = build_model("bit-cd")
    card = save_model_file(tmp_path / "models" / "bit-test", module, "bit-cd", cfg, InputSpec(tile_size=64))
    with pytest.raises(QgsProcessingException, match="cannot caption"):
        processing.run("changescribe:captionregions", {
            "BEFORE": str(pairs[0].before), "AFTER": str(pairs[0].after),
            "REGIONS": regions_layer(pairs[0].before), "MODEL_FILE": str(card), "OUTPUT": str(tmp_path / "c.gpkg")})
    assert not (tmp_path / "c.gpkg").exists()


def test_captionregions_cancel_leaves_no_output(qgis_app, tmp_path, pairs):
    import processing
    from qgis.core import QgsProcessingException

    feedback, reports = cancelling_feedback()
    with pytest.raises(QgsProcessingException, match="cancel"):
        processing.run("changescribe:captionregions", {
            "BEFORE": str(pairs[0].before), "AFTER": str(pairs[0].after), "REGIONS": regions_layer(pairs[0].before),
            "OUTPUT": str(tmp_path / "c.gpkg")}, feedback=feedback)
    assert reports
    assert list(tmp_path.iterdir()) == []


# --- graphical modeler -------------------------------------------------------------------------------------


def test_modeler_detect_then_caption(qgis_app, tmp_path, pairs):
    """A model built as the graphical modeler builds it: BEFORE/AFTER model inputs feed detectchanges, whose
    regions feed captionregions; both outputs are model outputs."""
    import processing
    from qgis.core import (QgsProcessingModelAlgorithm, QgsProcessingModelChildAlgorithm,
                           QgsProcessingModelChildParameterSource, QgsProcessingModelOutput,
                           QgsProcessingModelParameter, QgsProcessingParameterRasterLayer, QgsVectorLayer)

    model = QgsProcessingModelAlgorithm("change report", "tests")
    for name in ("BEFORE", "AFTER"):
        model.addModelParameter(QgsProcessingParameterRasterLayer(name, name.title()),
                                QgsProcessingModelParameter(name))
    param = QgsProcessingModelChildParameterSource.fromModelParameter
    static = QgsProcessingModelChildParameterSource.fromStaticValue

    def child(alg_id: str, child_id: str, sources: dict, output: str):
        c = QgsProcessingModelChildAlgorithm(alg_id)
        c.setChildId(child_id)
        for key, src in sources.items():
            c.addParameterSources(key, [src])
        for definition in c.algorithm().parameterDefinitions():  # what the modeler dialog fills in: defaults
            if definition.name() not in sources and not definition.isDestination() \
                    and definition.defaultValue() is not None:
                c.addParameterSources(definition.name(), [static(definition.defaultValue())])
        out = QgsProcessingModelOutput(output, output)
        out.setChildId(child_id)
        out.setChildOutputName("OUTPUT")
        c.setModelOutputs({output: out})
        return c

    model.addChildAlgorithm(child("changescribe:detectchanges", "detect", {
        "BEFORE": param("BEFORE"), "AFTER": param("AFTER"), "THRESHOLD": static(LOW), "CAPTIONS": static(False)},
        "regions"))
    model.addChildAlgorithm(child("changescribe:captionregions", "caption", {
        "BEFORE": param("BEFORE"), "AFTER": param("AFTER"), "BEAM_SIZE": static(1),
        "REGIONS": QgsProcessingModelChildParameterSource.fromChildOutput("detect", "OUTPUT")}, "captioned"))
    ok, errors = model.validate()
    assert ok, errors

    res = processing.run(model, {"BEFORE": str(pairs[0].before), "AFTER": str(pairs[0].after),
                                 "detect:regions": str(tmp_path / "regions.gpkg"),
                                 "caption:captioned": str(tmp_path / "captioned.gpkg")})
    detected = QgsVectorLayer(res["detect:regions"], "d", "ogr")
    captioned = QgsVectorLayer(res["caption:captioned"], "c", "ogr")
    assert detected.isValid() and captioned.isValid()
    assert captioned.featureCount() == detected.featureCount() > 0
    assert all(isinstance(f["caption"], str) and f["caption"] for f in captioned.getFeatures())
    assert "region_id" in captioned.fields().names() and "mean_prob" in captioned.fields().names()
    del detected, captioned


# --- headless and without torch ----------------------------------------------------------------------------


def test_qgis_process_headless_json(tmp_path, sample):
    before, after = sample
    out, report = tmp_path / "qp.gpkg", tmp_path / "qp.html"
    proc = subprocess.run([str(REPO / "scripts" / "qgis_process.sh"), "run", "changescribe:detectchanges", "--json",
                           "--", f"BEFORE={before}", f"AFTER={after}", "MODEL=pix4cap-synthetic", "DEVICE=cpu",
                           f"THRESHOLD={LOW}", "MIN_AREA=10", f"OUTPUT={out}", f"REPORT={report}"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    payload = json.loads(proc.stdout[proc.stdout.index("{"):])
    results = payload["results"]
    assert results["OUTPUT"].startswith(str(out)) and out.exists()
    assert results["REGION_COUNT"] > 0 and results["CAPTION"]
    assert results["REPORT"] == str(report) and report.read_text().count(DATA_URI) == 3


NO_TORCH = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('torch', 'dask', 'distributed'):
            raise ImportError(f'No module named {name!r}', name=name)
sys.meta_path.insert(0, Block())
from qgis.core import QgsApplication, QgsProcessingException
QgsApplication.setPrefixPath('/usr', True)
app = QgsApplication([], False)
app.initQgis()
sys.path.insert(0, '/usr/share/qgis/python/plugins')
from processing.core.Processing import Processing
Processing.initialize()
from changescribe.plugin.provider import ChangeScribeProvider
provider = ChangeScribeProvider()
QgsApplication.processingRegistry().addProvider(provider)
print('ALGS', sorted(a.id() for a in provider.algorithms()))
import processing
for alg in ('changescribe:detectchanges', 'changescribe:captionregions'):
    try:
        processing.run(alg, {'BEFORE': sys.argv[1], 'AFTER': sys.argv[2], 'REGIONS': sys.argv[3],
                             'OUTPUT': sys.argv[4]})
    except QgsProcessingException as exc:
        print('ERROR', alg, str(exc).replace(chr(10), ' '))
print('TORCH LOADED', 'torch' in sys.modules, 'DASK LOADED', 'dask' in sys.modules)
"""


def test_without_torch_the_toolbox_loads_and_says_how_to_install(tmp_path, pairs):
    regions = tmp_path / "regions.geojson"
    left, bottom, _, _ = pair_bounds(pairs[0].before)
    regions.write_text(json.dumps({"type": "FeatureCollection", "features": [{
        "type": "Feature", "properties": {},
        "geometry": box(left + 10, bottom + 10, left + 40, bottom + 40).__geo_interface__}],
        "crs": {"type": "name", "properties": {"name": "urn:ogc:def:crs:EPSG::32633"}}}))
    proc = subprocess.run([sys.executable, "-c", NO_TORCH, str(pairs[0].before), str(pairs[0].after), str(regions),
                           str(tmp_path / "out.gpkg")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert ("ALGS ['changescribe:captionregions', 'changescribe:detectchanges', 'changescribe:detectchangesbatch', "
            "'changescribe:exporttrainingdata', 'changescribe:importcheckpoint']") in proc.stdout
    errors = [line for line in proc.stdout.splitlines() if line.startswith("ERROR")]
    assert len(errors) == 2, proc.stdout
    for line in errors:
        assert "cannot import 'torch'" in line and "pip install" in line and "torch==2.14.1" in line
    assert "TORCH LOADED False DASK LOADED False" in proc.stdout  # the toolbox loads without torch and dask
    assert not (tmp_path / "out.gpkg").exists()


def test_run_and_load_results_styles_the_layer(qgis_app, tmp_path, pairs):
    import processing
    from qgis.core import QgsGraduatedSymbolRenderer, QgsProject

    project = QgsProject.instance()
    project.clear()
    processing.runAndLoadResults("changescribe:detectchanges", {
        "BEFORE": str(pairs[0].before), "AFTER": str(pairs[0].after), "THRESHOLD": LOW, "CAPTIONS": False,
        "OUTPUT": str(tmp_path / "styled.gpkg")})
    layers = [lyr for lyr in project.mapLayers().values() if "styled.gpkg" in lyr.source()]
    assert len(layers) == 1
    layer = layers[0]
    assert "layername=change_regions" in layer.source()
    assert isinstance(layer.renderer(), QgsGraduatedSymbolRenderer)
    assert layer.renderer().classAttribute() == "mean_prob"
    assert "caption" in layer.mapTipTemplate()
    assert layer.abstract()
    project.clear()
