"""core/report.py: the one-file HTML report (thumbnails as PNG data URIs, escaped captions, atomic write)."""

from __future__ import annotations

import base64
import html
import io
import os
import re
import sys
import tempfile
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import rasterio
from shapely.geometry import box

from changescribe.core.geopackage import RegionWriter
from changescribe.core.inference import InferenceStats
from changescribe.core.pipeline import ChangeResult
from changescribe.core.raster_pair import AlignmentReport
from changescribe.core.report import write_report
from changescribe.training.synthetic import write_pair

DATA_URI = '<img src="data:image/png;base64,'
SCENE = 'a <script>alert("x")</script> & two "new" houses'
REGION_CAPTION = "<b>road</b> & 'trees'"


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return write_pair(tmp_path_factory.mktemp("report"), "r", size=192, seed=5, change_level=0.8)


def make_result(before: Path, regions_bounds: list[tuple[float, float, float, float]],
                flags: list[str] | None = None) -> ChangeResult:
    with rasterio.open(before) as src:
        crs = src.crs
    regions = gpd.GeoDataFrame(
        {"region_id": list(range(1, len(regions_bounds) + 1)),
         "area_m2": [(b[2] - b[0]) * (b[3] - b[1]) for b in regions_bounds],
         "mean_prob": [0.7] * len(regions_bounds), "max_prob": [0.9] * len(regions_bounds),
         "caption": [REGION_CAPTION] * len(regions_bounds),
         "caption_flag": flags or [""] * len(regions_bounds),
         "model_caption": ["a road is built in the centre of the scene"] * len(regions_bounds),
         "change_type": ["new building"] * len(regions_bounds), "type_confidence": [0.8] * len(regions_bounds)},
        geometry=gpd.GeoSeries([box(*b) for b in regions_bounds], crs=crs), crs=crs)
    alignment = AlignmentReport(crs=str(crs), before_res=(0.5, 0.5), after_res=(0.5, 0.5), output_res=(0.5, 0.5),
                                after_reprojected=False, before_resampled=False, after_resampled=False,
                                clipped=False, width=192, height=192, overlap_area_m2=192 * 192 * 0.25)
    # The result's regions live in a GeoPackage, as a run leaves them (beside the inputs: each test's tmp_path
    # must hold only what the report writes).
    fd, gpkg = tempfile.mkstemp(suffix=".gpkg", dir=Path(before).parent)
    os.close(fd)
    os.unlink(gpkg)
    with RegionWriter(gpkg, crs.to_wkt()) as writer:
        writer.append(regions)
    return ChangeResult(output=None, regions=writer.layer(), scene_caption=SCENE, summary="1 changed region",
                        alignment=alignment, probability=None,
                        stats=InferenceStats(tiles=1, seconds=0.1, model_seconds=0.1, batch_size=1, device="cpu"),
                        metadata={"model": {"name": "test-model", "version": "1"}, "threshold": 0.5})


def images(text: str) -> list[np.ndarray]:
    from PIL import Image

    return [np.asarray(Image.open(io.BytesIO(base64.b64decode(m))).convert("RGBA"))
            for m in re.findall(r'data:image/png;base64,([A-Za-z0-9+/=]+)"', text)]


def region_box(before: Path, frac=(0.25, 0.25, 0.6, 0.6)) -> tuple[float, float, float, float]:
    with rasterio.open(before) as src:
        l, b, r, t = src.bounds
    w, h = r - l, t - b
    return (l + frac[0] * w, b + frac[1] * h, l + frac[2] * w, b + frac[3] * h)


def test_report_is_one_self_contained_file_with_escaped_captions(pair, tmp_path):
    result = make_result(pair.before, [region_box(pair.before)])
    out = write_report(tmp_path / "report.html", pair.before, pair.after, result)
    text = out.read_text(encoding="utf-8")
    assert text.count(DATA_URI) == 3
    assert html.escape(SCENE) in text and "<script>" not in text
    assert html.escape(REGION_CAPTION) in text and "<b>road</b>" not in text
    assert "test-model" in text and 'charset="utf-8"' in text
    assert "src=\"http" not in text and "src='http" not in text  # nothing fetched from outside
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.html"]  # no temporary left behind


def test_report_lists_flagged_captions(pair, tmp_path):
    result = make_result(pair.before, [region_box(pair.before), region_box(pair.before, (0.7, 0.7, 0.8, 0.8))],
                         flags=["", "names a road or path on a <compact> region"])
    text = write_report(tmp_path / "report.html", pair.before, pair.after, result).read_text(encoding="utf-8")
    assert "<h2>Flagged decoder captions (1)</h2>" in text
    flags = text[text.index('<table id="flags">'):]
    assert "names a road or path on a &lt;compact&gt; region" in flags and "<compact>" not in text
    assert flags.count('<tr class="flag">') == 1 and "a road is built in the centre of the scene" in flags
    assert text.count('<td class="flagged">⚠ ') == 1 and "new building (0.80)" in text
    unflagged = make_result(pair.before, [region_box(pair.before)])
    text = write_report(tmp_path / "plain.html", pair.before, pair.after, unflagged).read_text(encoding="utf-8")
    assert "Flagged decoder captions" not in text


def test_report_thumbnails_show_regions_in_red_on_the_after_image(pair, tmp_path):
    result = make_result(pair.before, [region_box(pair.before)])
    text = write_report(tmp_path / "r.html", pair.before, pair.after, result, max_side=96).read_text()
    before, after, overlay = images(text)
    assert before.shape == after.shape == overlay.shape == (96, 96, 4)
    red = (overlay[..., 0] == 255) & (overlay[..., 1] == 0) & (overlay[..., 2] == 0)
    assert red.sum() > 40  # the outline
    rows, cols = np.nonzero(red)
    # The region spans 25–60 % of the scene; the outline stays there (y grows downwards in the image).
    assert 0.2 * 96 <= cols.min() and cols.max() <= 0.65 * 96
    assert 0.35 * 96 <= rows.min() and rows.max() <= 0.8 * 96
    # Outside the region the overlay is the after image itself.
    assert np.array_equal(overlay[:10, :10], after[:10, :10])
    assert not np.array_equal(before, after)


def test_report_small_rasters_are_not_upsampled(pair, tmp_path):
    text = write_report(tmp_path / "r.html", pair.before, pair.after, make_result(pair.before, [])).read_text()
    assert [im.shape[:2] for im in images(text)] == [(192, 192)] * 3
    assert "No change region" in text


def test_report_other_crs_uint16_and_bounds(tmp_path):
    p = write_pair(tmp_path / "in", "u", size=160, seed=9, dtype="uint16", after_crs="EPSG:3857")
    bounds = region_box(p.before, (0.0, 0.0, 0.5, 1.0))  # the left half
    result = make_result(p.before, [region_box(p.before, (0.1, 0.1, 0.3, 0.3))])
    text = write_report(tmp_path / "r.html", p.before, p.after, result, bounds=bounds).read_text()
    before, after, overlay = images(text)
    assert before.shape[:2] == (160, 80)  # half the width, native resolution
    assert after.shape == before.shape
    assert before[..., :3].std() > 10 and after[..., :3].std() > 10  # stretched, not a flat grey
    assert ((overlay[..., 0] == 255) & (overlay[..., 1] == 0)).any()


@pytest.mark.parametrize("blocked", [("PIL",), ("PIL", "matplotlib")])
def test_report_without_pil(pair, tmp_path, monkeypatch, blocked):
    for name in blocked:  # a later `import name` raises ImportError
        monkeypatch.setitem(sys.modules, name, None)
    text = write_report(tmp_path / "r.html", pair.before, pair.after, make_result(pair.before, [region_box(
        pair.before)]), max_side=64).read_text()
    monkeypatch.undo()
    assert text.count(DATA_URI) == 3
    decoded = images(text)
    assert [im.shape[:2] for im in decoded] == [(64, 64)] * 3
    assert ((decoded[2][..., 0] == 255) & (decoded[2][..., 1] == 0)).any()


def test_builtin_png_encoder_round_trips():
    from PIL import Image

    from changescribe.core.report import encode_png

    rng = np.random.default_rng(0)
    for channels in (3, 4):
        img = rng.integers(0, 256, size=(7, 11, channels), dtype=np.uint8)
        back = np.asarray(Image.open(io.BytesIO(encode_png(img))))
        assert np.array_equal(back, img)


def test_report_write_is_atomic(pair, tmp_path, monkeypatch):
    import changescribe.core.report as report

    target = tmp_path / "r.html"
    target.write_text("old report")

    def fail(*args):
        raise OSError("disk full")

    monkeypatch.setattr(report.os, "replace", fail)
    from changescribe.core.outputs import OutputError

    with pytest.raises(OutputError, match="cannot write the report .*disk full"):
        write_report(target, pair.before, pair.after, make_result(pair.before, []), max_side=32)
    assert target.read_text() == "old report"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.html"]
