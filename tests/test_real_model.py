"""The default model on REAL imagery, through the public pipeline, as a user would run it.

The real crops in ../shared/data were used to fine-tune the shipped model (leave-one-dataset-out scores are in
its card and the README), so these tests check behaviour, not held-out accuracy: real new buildings are found,
an unchanged real scene stays (almost) empty, fill strips and roads of a real georeferenced pair are not change,
and the card states what the weights were trained on and under which terms.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import rasterio
from rasterio.features import rasterize
from rasterio.transform import from_origin

from changescribe.core.model_loading import DEFAULT_MODEL, find_model, load_model
from changescribe.core.pipeline import detect_changes
from conftest import SHARED_DATA, write_geotiff

LEVIRCD = SHARED_DATA / "levircd_256"
JOPLIN = SHARED_DATA / "joplin_geo" / "coregistered"
needs_data = pytest.mark.skipif(not LEVIRCD.is_dir(), reason="../shared/data is not beside the repo")


@pytest.fixture(scope="module")
def model():
    return load_model("default", "cpu")


def _crop_pair(tmp_path, name: str):
    from PIL import Image

    tr = from_origin(500000, 4100000, 0.5, 0.5)
    paths = []
    for date in ("A", "B"):
        arr = np.asarray(Image.open(LEVIRCD / date / name).convert("RGB")).transpose(2, 0, 1).copy()
        paths.append(write_geotiff(tmp_path / f"{date}.tif", arr, crs="EPSG:32615", transform=tr))
    truth = np.asarray(Image.open(LEVIRCD / "label" / name).convert("L")) > 127
    return paths, truth, tr


def test_the_default_is_the_real_imagery_model_and_its_card_says_so():
    assert DEFAULT_MODEL == "pix4cap-lite-real"
    card = json.loads(find_model("default").read_text())
    assert card["architecture"] == "pix4cap-lite"
    assert "research" in card["weights_terms"] and "Apache-2.0" in card["training_data"]
    real = [b for b in card["metrics"].values() if isinstance(b, dict) and b.get("data", "").startswith("real crops")]
    # 2-fold cross-validation on each dataset's crops: every crop is scored once by a model that did not see it
    assert {b["data"] for b in real} == {"real crops (LEVIR-CD), held out", "real crops (DSIFN), held out"}
    assert sum(b["pairs"] for b in real) == 8 and all("F1" in b and "Precision" in b for b in real)
    # scored at the shipped file's own decision point: the calibrated model at 0.5 (training.calibration)
    assert all(b["threshold"] == 0.5 for b in real) and card["calibration"]["original_threshold"] < 0.5


@needs_data
@pytest.mark.parametrize("name", ["train_412_0512_0768.png", "val_27_0000_0256.png"])
def test_real_new_buildings_are_found(tmp_path, model, name):
    (before, after), truth, tr = _crop_pair(tmp_path, name)
    result = detect_changes(before, after, model, tmp_path / "r.gpkg", captions=False)
    regions = result.regions.read()
    pred = rasterize([(g, 1) for g in regions.geometry], out_shape=truth.shape, transform=tr).astype(bool) \
        if len(regions) else np.zeros_like(truth)
    tp = (pred & truth).sum()
    precision, recall = tp / max(pred.sum(), 1), tp / max(truth.sum(), 1)
    print(f"{name}: precision {precision:.2f} recall {recall:.2f}, {len(regions)} regions")
    assert recall > 0.4 and precision > 0.5


@needs_data
def test_an_unchanged_real_scene_stays_almost_empty(tmp_path, model):
    (before, after), truth, tr = _crop_pair(tmp_path, "train_386_0512_0768.png")  # its label is all zero
    assert not truth.any()
    result = detect_changes(before, after, model, tmp_path / "r.gpkg", captions=False)
    changed = sum(result.regions.read().area) / (256 * 256 * 0.25)
    assert changed < 0.05


@needs_data
def test_real_georeferenced_pair_fill_strip_is_not_change_and_captions_are_grounded(tmp_path, model):
    """Joplin after the 2011 tornado: the after image has a black fill strip along its western edge."""
    before, after = JOPLIN / "chip0_pre.tif", JOPLIN / "chip0_post.tif"
    result = detect_changes(before, after, model, tmp_path / "j.gpkg", min_area=20.0)
    regions = result.regions.read()
    assert len(regions) > 0
    with rasterio.open(after) as src:
        band = src.read(1, window=((0, src.height), (0, 40)))
        strip_cols = int((band == 0).all(axis=0).sum())
        assert strip_cols >= 5  # the strip is there
        x_strip_end = src.transform.c + strip_cols * src.transform.a
    assert (regions.geometry.bounds.minx >= x_strip_end - 2 * 0.6).all()
    for caption in regions["caption"]:
        assert "no difference" not in caption and "the same as before" not in caption
        assert "corner" not in caption  # crop positions are replaced by the position in the scene
