"""The run contract (core/api.py): every entry point builds the same DetectRequest, and every option is checked
in one place with a one-line message that states its range.

Real argparse, a real QgsApplication with the Processing algorithm and the dock's real model panel, a real worker
process; nothing is mocked.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from changescribe.core.api import FIELDS, Area, DetectRequest, DetectResult
from changescribe.core.cli import REQUEST_ARGUMENTS, build_parser, detect_request, main
from changescribe.core.errors import InputError

REPO = Path(__file__).resolve().parent.parent
CARD = str(REPO / "resources" / "models" / "pix4cap-synthetic.json")
RECT = (500010.0, 4999700.0, 500200.0, 4999950.0)  # xmin, ymin, xmax, ymax inside the sample pair, EPSG:32633


def test_request_round_trips_through_json_and_refuses_unknown_options():
    r = DetectRequest(before="a.tif", after="b.tif", output="o.gpkg", threshold="0.3", tile_size="64", overlap=8,
                      target_gsd="model", area_of_interest={"wkt": "POLYGON((0 0,1 0,1 1,0 0))", "crs": "EPSG:4326"},
                      beam_size=2, captions=False)
    assert r.threshold == 0.3 and r.tile_size == 64 and isinstance(r.area_of_interest, Area)
    assert DetectRequest.from_json(r.to_json()) == r
    with pytest.raises(InputError, match="unknown run option"):
        DetectRequest.from_dict({**r.to_dict(), "treshold": 0.4})
    with pytest.raises(InputError, match="lacks after"):
        DetectRequest.from_dict({"before": "a.tif"})
    result = DetectResult(output="o.gpkg", regions=3, scene_caption="c", summary="s", flagged=2, alignment=("x",),
                          notes=("n",))
    assert DetectResult.from_event(json.loads(json.dumps(result.to_event()))) == result


# Every numeric option out of range (issue 15, items 4 and 7), and what the one line must say.
BAD_OPTIONS = [
    (["--threshold", "abc"], "threshold must be a number between 0 and 1"),
    (["--threshold", "1.5"], "threshold must be between 0 and 1"),
    (["--threshold", "0"], "threshold must be between 0 and 1"),
    (["--min-area", "-5"], "min area must be 0 or more square metres, got -5"),
    (["--min-area", "nan"], "min area must be a number"),
    (["--tile-size", "1"], "tile size must be between 32 and 8192 pixels"),
    (["--tile-size", "100000"], "tile size must be between 32 and 8192 pixels"),
    (["--tile-size", "6000", "--batch-size", "8"], "too large to allocate"),
    (["--tile-size", "64.5"], "tile size must be a whole number"),
    (["--overlap", "64", "--tile-size", "64"], "overlap must be less than the tile size (64 px)"),
    (["--overlap", "-3"], "overlap must be 0 or more pixels"),
    (["--overlap", "400"], "overlap must be less than the tile size ("),  # checked against the model's tile size
    (["--batch-size", "0"], "batch size must be between 1 and"),
    (["--gsd", "0"], "gsd must be more than 0 metres per pixel"),
    (["--gsd", "-1"], "gsd must be more than 0 metres per pixel"),
    (["--gsd", "fine"], "gsd must be a number more than 0"),
    (["--beam-size", "0"], "beam size must be between 1 and 20"),
    (["--device", "gpu"], "unknown device 'gpu'"),
    (["--probability", "p.png"], "must be a GeoTIFF (.tif)"),
    (["--area", "POLYGON((0 0,1 0,1 1,0 0))"], "area of interest must be a polygon (WKT) with its CRS"),
]


@pytest.mark.parametrize("extra, message", BAD_OPTIONS, ids=[" ".join(e) for e, _ in BAD_OPTIONS])
def test_cli_refuses_options_out_of_range_in_one_line(tmp_path, sample, capsys, extra, message):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    extra = [str(out_dir / e) if e.endswith(".png") else e for e in extra]
    code = main(["detect", *sample, "-o", str(out_dir / "r.gpkg"), "-q", "--device", "cpu", *extra])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("changescribe: error: ") and err.count("\n") == 1 and message in err, err
    assert "Traceback" not in err
    assert list(out_dir.iterdir()) == []


def test_cli_option_error_in_a_real_process_has_no_traceback(tmp_path, sample):
    proc = subprocess.run([sys.executable, "-m", "changescribe", "detect", *sample, "-o", str(tmp_path / "r.gpkg"),
                           "--tile-size", "1"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "changescribe: error: tile size must be between 32 and 8192 pixels (or the model's), got 1"]
    assert list(tmp_path.iterdir()) == []


# ---- one request, four entry points ---------------------------------------------------------------------------
CHOICES = {"threshold": 0.3, "min_area": 20.0, "tile_size": 128, "overlap": 16, "batch_size": 4,
           "target_gsd": "model", "captions": False, "beam_size": 2, "device": "cpu", "detector": "pix4cap-synthetic",
           "onnxruntime": False}


def cli_request(before, after, out: Path, area_wkt: str) -> DetectRequest:
    args = build_parser().parse_args([
        "detect", before, after, "-o", str(out), "--model", CARD, "--detector", CHOICES["detector"], "--device", "cpu",
        "--threshold", "0.3", "--min-area", "20", "--tile-size", "128", "--overlap", "16", "--batch-size", "4",
        "--gsd", "model", "--no-captions", "--no-onnxruntime", "--beam-size", "2", "--probability", str(out.with_name(out.stem +
                                                                                       "_probability.tif")),
        "--cache", str(out.parent / "cache"), "--area", area_wkt, "--area-crs", "EPSG:32633"])
    return detect_request(args)


def processing_request(qgis_app, before, after, out: Path) -> DetectRequest:
    from qgis.core import (QgsApplication, QgsProcessingContext, QgsProcessingFeedback, QgsProject,
                           QgsRasterLayer)

    alg = QgsApplication.processingRegistry().algorithmById("changescribe:detectchanges").create()
    context, feedback = QgsProcessingContext(), QgsProcessingFeedback()
    context.setProject(QgsProject.instance())
    b, a = QgsRasterLayer(before, "b"), QgsRasterLayer(after, "a")
    params = {"BEFORE": before, "AFTER": after, "OUTPUT": str(out), "MODEL_FILE": CARD,
              "DETECTOR": CHOICES["detector"], "DEVICE": "cpu", "THRESHOLD": 0.3, "MIN_AREA": 20, "TILE_SIZE": 128,
              "OVERLAP": 16, "BATCH_SIZE": 4, "GSD": -1, "CAPTIONS": False, "ONNXRUNTIME": False, "BEAM_SIZE": 2,
              "OUTPUT_PROBABILITY": str(out.with_name(out.stem + "_probability.tif")),
              "EXTENT": f"{RECT[0]},{RECT[2]},{RECT[1]},{RECT[3]} [EPSG:32633]"}
    ok, message = alg.checkParameterValues(params, context)
    assert ok, message
    return alg.build_request(params, context, feedback, b, a)


def dock_request_of(qgis_app, before, after, out: Path, area_wkt: str) -> DetectRequest:
    from changescribe.plugin.dock import dock_request
    from changescribe.plugin.dock_widgets_model import ModelPanel

    panel = ModelPanel()
    panel.refresh_models([], CARD)
    panel.device_combo.setCurrentIndex(panel.device_combo.findData("cpu"))
    panel.threshold_spin.setValue(0.3)
    panel.min_area_spin.setValue(20)
    panel.tile_spin.setValue(128)
    panel.overlap_spin.setValue(16)
    panel.batch_spin.setValue(4)
    panel.gsd_check.setChecked(True)
    panel.captions_check.setChecked(False)
    panel.onnx_check.setChecked(False)
    panel.beam_spin.setValue(2)
    panel.detector_combo.setCurrentIndex(panel.detector_combo.findData(CHOICES["detector"]))
    panel.probability_check.setChecked(True)
    return dock_request(panel, before, after, out, {"wkt": area_wkt, "crs": "EPSG:32633"})


def test_cli_worker_processing_and_dock_build_the_same_request(qgis_app, sample, tmp_path):
    from qgis.core import QgsGeometry, QgsRectangle

    out = tmp_path / "out" / "changes.gpkg"
    area_wkt = QgsGeometry.fromRect(QgsRectangle(*RECT)).asWkt()
    cli = cli_request(*sample, out, area_wkt)
    dock = dock_request_of(qgis_app, *sample, out, area_wkt)
    processing = processing_request(qgis_app, *sample, out)
    assert dock.to_json() == cli.to_json()
    # the worker's request is the JSON line the dock sends it
    assert DetectRequest.from_json(dock.to_json()).to_json() == cli.to_json()
    # Processing keeps no cache (REQUEST_UNSET); its extent is the same rectangle, as QGIS writes it
    assert processing.area_of_interest is not None
    from shapely import wkt

    assert wkt.loads(processing.area_of_interest.wkt).equals(wkt.loads(area_wkt))
    same_area = dataclasses.replace(processing, area_of_interest=cli.area_of_interest)
    assert same_area.to_json() == dataclasses.replace(cli, cache_dir=None).to_json()
    for name, value in CHOICES.items():
        assert getattr(cli, name) == value, name


def test_every_request_field_reaches_every_entry_point(qgis_app):
    """A new DetectRequest field fails this test until each entry point maps it (or says why it does not)."""
    from qgis.core import QgsApplication

    from changescribe.plugin.detect_changes_algorithm import DetectChangesAlgorithm
    from changescribe.plugin.dock import DOCK_FIELDS, DOCK_UNSET
    from changescribe.plugin.dock_widgets_model import PANEL_FIELDS, ModelPanel

    fields = set(FIELDS)
    # CLI: one argument per field, whose dest is the field (the area's CRS comes with --area)
    assert set(REQUEST_ARGUMENTS) == fields
    parser = build_parser()
    detect = next(a for a in parser._subparsers._group_actions[0].choices.values() if a.prog.endswith("detect"))
    dests = {a.dest: a for a in detect._actions}
    for name, flag in REQUEST_ARGUMENTS.items():
        assert name in dests and (flag in dests[name].option_strings or dests[name].dest == flag), name
    # Processing: every field is a parameter of the algorithm, or deliberately not exposed
    alg = QgsApplication.processingRegistry().algorithmById("changescribe:detectchanges")
    assert set(DetectChangesAlgorithm.REQUEST_PARAMETERS) | set(DetectChangesAlgorithm.REQUEST_UNSET) == fields
    for names in DetectChangesAlgorithm.REQUEST_PARAMETERS.values():
        for param in names.split(", "):
            assert alg.parameterDefinition(param) is not None, param
    # Dock: the model panel's options plus what the dock decides itself
    assert set(DOCK_FIELDS) | set(DOCK_UNSET) == fields and not set(DOCK_FIELDS) & set(DOCK_UNSET)
    panel = ModelPanel()
    panel.refresh_models([], CARD)
    assert set(panel.request_options()) == set(PANEL_FIELDS)
    # Worker: its job is the request's JSON, so every field travels
    full = DetectRequest(before="a.tif", after="b.tif", output="o.gpkg", model="m", detector="d", device="cuda:1",
                         threshold=0.2, min_area=5.0, tile_size=64, overlap=4, batch_size=2, target_gsd=1.5,
                         area_of_interest=Area("POLYGON((0 0,1 0,1 1,0 0))", "EPSG:4326"), captions=False,
                         beam_size=3, probability_output="p.tif", reuse_probability="r.tif", cache_dir="c",
                         overwrite=True, fill_nodata=False, onnxruntime=False)
    default = DetectRequest(before="a.tif", after="b.tif")
    assert all(getattr(full, f) != getattr(default, f) for f in FIELDS if f not in ("before", "after"))
    assert DetectRequest.from_json(full.to_json()) == full
