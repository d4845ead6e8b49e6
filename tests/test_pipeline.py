"""The whole job on real GeoTIFFs with the shipped trained model: masks, captions, GeoPackage, QGIS."""

from __future__ import annotations

import numpy as np
import pytest
import rasterio
from rasterio.features import rasterize

from changescribe.core.errors import Cancelled
from changescribe.core.geopackage import RUNS_TABLE, read_run
from changescribe.core.model_loading import load_model
from changescribe.core.pipeline import detect_changes
from changescribe.core.run_control import RunControl
from changescribe.training.synthetic import write_pair

# Seeds far from the training seeds (0..2999) and validation seeds (1,000,000+).
TEST_SEEDS = (7_000_001, 7_000_002)


@pytest.fixture(scope="module")
def model():
    """The model trained on generated scenes: these tests check the whole pipeline against the generator's true
    masks, which only that model was taught (the default model learnt real buildings; tests/test_real_model.py)."""
    return load_model("pix4cap-synthetic", "cpu")


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return write_pair(tmp_path_factory.mktemp("pair"), "p", size=384, seed=TEST_SEEDS[0], change_level=0.8)


def mask_iou(regions, mask_path) -> float:
    with rasterio.open(mask_path) as src:
        truth = src.read(1).astype(bool)
        pred = rasterize([(g, 1) for g in regions.to_crs(src.crs).geometry], out_shape=truth.shape,
                         transform=src.transform).astype(bool) if len(regions) else np.zeros_like(truth)
    return float((truth & pred).sum() / max((truth | pred).sum(), 1))


def test_default_model_recovers_the_true_change_mask(tmp_path, model, pair):
    out = tmp_path / "result.gpkg"
    result = detect_changes(pair.before, pair.after, model, out, threshold=0.5, min_area=2.0)
    iou = mask_iou(result.regions.read(), pair.mask)
    print(f"IoU against the generator's mask: {iou:.3f} ({len(result.regions)} regions)")
    assert iou >= 0.6
    assert result.output == out and out.exists()
    assert result.scene_caption and all(isinstance(c, str) and c for c in result.regions.read()["caption"])
    run = read_run(out)
    assert run["model"]["name"] == model.name and run["threshold"] == 0.5
    assert run["scene_caption"] == result.scene_caption
    assert run["alignment"]["width"] == 384
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "result.gpkg"]
    assert leftovers == []


def test_pair_in_two_crs_aligns_and_still_finds_the_change(tmp_path, model):
    files = write_pair(tmp_path / "pair", "p", size=384, seed=TEST_SEEDS[1], change_level=0.8,
                       after_crs="EPSG:3857")
    result = detect_changes(files.before, files.after, model, tmp_path / "r.gpkg", min_area=2.0)
    assert result.alignment.after_reprojected
    assert result.regions.crs.to_epsg() == 32633
    iou = mask_iou(result.regions.read(), files.mask)
    print(f"IoU after reprojection: {iou:.3f}")
    assert iou >= 0.5


def test_probability_raster_output(tmp_path, model, pair):
    prob = tmp_path / "prob.tif"
    result = detect_changes(pair.before, pair.after, model, None, probability_output=prob, captions=False)
    assert result.output is None and result.probability == prob
    with rasterio.open(prob) as src, rasterio.open(pair.before) as b:
        assert src.crs == b.crs and src.transform == b.transform and src.dtypes[0] == "float32"
        values = src.read(1)
    assert 0.0 <= values.min() and values.max() <= 1.0
    assert (result.regions.read()["caption"] == "").all()


def test_cancel_leaves_nothing_behind(tmp_path, model, pair):
    calls = {"n": 0}

    def cancel_after_first_batch() -> bool:
        calls["n"] += 1
        return calls["n"] > 1

    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(Cancelled):
        detect_changes(pair.before, pair.after, model, out / "r.gpkg", batch_size=1, probability_output=out / "p.tif",
                       control=RunControl(is_cancelled=cancel_after_first_batch))
    assert list(out.iterdir()) == []


def test_result_geopackage_opens_in_qgis(qgis_app, tmp_path, model, pair):
    from qgis.core import QgsVectorLayer

    out = tmp_path / "result.gpkg"
    result = detect_changes(pair.before, pair.after, model, out, min_area=2.0)
    layer = QgsVectorLayer(f"{out}|layername=change_regions", "changes", "ogr")
    assert layer.isValid()
    assert layer.featureCount() == len(result.regions)
    names = layer.fields().names()
    for field in ("region_id", "area_m2", "mean_prob", "max_prob", "caption", "model_name", "threshold"):
        assert field in names
    assert layer.crs().authid() == "EPSG:32633"
    captions = [f["caption"] for f in layer.getFeatures()]
    assert captions == list(result.regions.read()["caption"])
    runs = QgsVectorLayer(f"{out}|layername={RUNS_TABLE}", "runs", "ogr")
    assert runs.isValid() and runs.featureCount() == 1
    assert next(runs.getFeatures())["scene_caption"] == result.scene_caption
    del layer, runs


def test_area_of_interest_limits_the_run(tmp_path):
    from shapely.geometry import box

    from changescribe.core.raster_pair import AreaOfInterest
    from conftest import OracleModel, block_pair, write_geotiff

    before, after, _ = block_pair(300, seed=3)
    after[:, :, :] = np.where(before > 0, 230, 0)  # everything changed: regions show exactly where we looked
    b = write_geotiff(tmp_path / "b.tif", before)
    a = write_geotiff(tmp_path / "a.tif", after)
    # a square of 50 m × 50 m (100 × 100 px) in the before raster's CRS, in its upper-left part
    aoi = AreaOfInterest(box(500010.0, 5000000.0 - 60.0, 500060.0, 5000000.0 - 10.0), "EPSG:32633")
    result = detect_changes(b, a, OracleModel(64), tmp_path / "r.gpkg", area_of_interest=aoi)
    assert (result.alignment.width, result.alignment.height) == (100, 100)
    assert len(result.regions) == 1
    region = result.regions.read().iloc[0]
    assert region.area_m2 == pytest.approx(2500.0, rel=0.01)
    assert region.geometry.within(aoi.geometry.buffer(0.01))
    # the same AOI given in WGS 84 selects the same ground
    from pyproj import Transformer
    from shapely.ops import transform

    to_wgs84 = Transformer.from_crs("EPSG:32633", "EPSG:4326", always_xy=True).transform
    result84 = detect_changes(b, a, OracleModel(64), None,
                              area_of_interest=AreaOfInterest(transform(to_wgs84, aoi.geometry), "EPSG:4326"))
    assert result84.regions.read().area_m2.iloc[0] == pytest.approx(2500.0, rel=0.03)


def test_rerun_reuses_the_probability_map(tmp_path):
    from conftest import OracleModel, block_pair, write_geotiff

    before, after, _ = block_pair(256, seed=5)
    b = write_geotiff(tmp_path / "b.tif", before)
    a = write_geotiff(tmp_path / "a.tif", after)
    cache = tmp_path / "cache.tif"
    first = detect_changes(b, a, OracleModel(64), tmp_path / "r1.gpkg", threshold=0.5, probability_output=cache)
    assert first.stats.tiles > 0 and cache.exists()
    again = detect_changes(b, a, OracleModel(64), tmp_path / "r2.gpkg", threshold=0.9, min_area=20.0,
                           reuse_probability=cache, probability_output=cache)
    fresh = detect_changes(b, a, OracleModel(64), tmp_path / "r3.gpkg", threshold=0.9, min_area=20.0)
    assert again.stats.tiles == 0 and cache.exists()
    assert list(again.regions.read().area_m2) == list(fresh.regions.read().area_m2)
    with pytest.raises(Exception, match="another grid"):
        other = write_geotiff(tmp_path / "other.tif", before[:, :200, :200].copy())
        detect_changes(other, other, OracleModel(64), None, reuse_probability=cache)


def test_regions_streamed_strip_by_strip_into_the_geopackage_match_one_pass(tmp_path, monkeypatch):
    import changescribe.core.regions as regions_mod
    from conftest import OracleModel, write_geotiff

    rng = np.random.default_rng(11)
    before = rng.integers(60, 120, size=(3, 256, 256)).astype(np.uint8)
    after = before.copy()
    for top in range(2, 240, 12):  # 20 rows of small blocks, 3 per row
        for left in rng.choice(np.arange(0, 200, 40), size=3, replace=False):
            after[:, top:top + 6, left:left + int(rng.integers(6, 30))] = 230
    after[:, 10:250, 240:246] = 230  # one region across every seam of 64-row strips
    b = write_geotiff(tmp_path / "b.tif", before)
    a = write_geotiff(tmp_path / "a.tif", after)
    one_pass = detect_changes(b, a, OracleModel(64), tmp_path / "one.gpkg", min_area=2.0)
    monkeypatch.setattr(regions_mod, "STRIP_PIXELS", 256 * 64)  # 64-row strips, and stats read in 64-px bands
    streamed = detect_changes(b, a, OracleModel(64), tmp_path / "strips.gpkg", min_area=2.0)
    assert len(streamed.regions) == len(one_pass.regions) == 61
    assert streamed.summary == one_pass.summary
    one, strips = one_pass.regions.read(), streamed.regions.read()
    assert list(strips.region_id) == list(range(1, 62))
    assert sorted(strips.area_m2) == pytest.approx(sorted(one.area_m2), rel=1e-3)
    assert sorted(strips.mean_prob) == pytest.approx(sorted(one.mean_prob), abs=1e-3)
    assert strips.area_m2.max() == pytest.approx(240 * 6 * 0.25, rel=0.02)  # the long one, whole
    with rasterio.open(b) as src:
        burn = [rasterize(list(f.geometry), out_shape=(256, 256), transform=src.transform) for f in (one, strips)]
    assert np.array_equal(*burn)
    # read back in batches or largest first, as the report does, without loading the layer whole
    batches = list(streamed.regions.batches(size=25))
    assert [len(x) for x in batches] == [25, 25, 11]
    assert list(np.concatenate([x.region_id for x in batches])) == list(strips.region_id)
    top = streamed.regions.largest(5)
    assert list(top.area_m2) == sorted(strips.area_m2, reverse=True)[:5]
    assert read_run(tmp_path / "strips.gpkg")["summary"] == streamed.summary


def test_without_an_output_the_regions_live_in_a_scratch_file_removed_with_the_result(tmp_path):
    import gc

    from conftest import OracleModel, block_pair, write_geotiff

    before, after, _ = block_pair(128, seed=2)
    b = write_geotiff(tmp_path / "b.tif", before)
    a = write_geotiff(tmp_path / "a.tif", after)
    result = detect_changes(b, a, OracleModel(64), None)
    scratch = result.regions.path
    assert result.output is None and scratch.exists() and len(result.regions.read()) == len(result.regions) > 0
    del result
    gc.collect()
    assert not scratch.parent.exists()
