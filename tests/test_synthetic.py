"""Synthetic pair generator: determinism, windowed rendering, ground truth, GeoTIFF output, captions."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import rasterio

from changescribe.core.annotations import NO_CHANGE_CAPTIONS
from changescribe.training import synthetic as syn

VOCAB = Path("/work/shared/data/levircc/vocab.json")


def test_same_seed_same_pair():
    a, b = syn.make_pair(128, seed=3), syn.make_pair(128, seed=3)
    for x, y in ((a.before, b.before), (a.after, b.after), (a.change_mask, b.change_mask)):
        assert np.array_equal(x, y)
    assert a.captions == b.captions and a.changes == b.changes
    c = syn.make_pair(128, seed=4)
    assert not np.array_equal(a.before, c.before)


def test_windowed_rendering_equals_whole():
    # nuisance=1 gives the largest misregistration, so shifted coordinates are exercised too.
    scene = syn.make_scene(300, 420, seed=11, change_level=1.0, nuisance=1.0)
    assert scene.looks["after"].shift != (0.0, 0.0)
    for time in ("before", "after"):
        whole = syn.render(scene, (0, 0, 300, 420), time, "uint16", 2)
        tiled = np.zeros_like(whole)
        for r in range(0, 300, 128):
            for c in range(0, 420, 100):
                h, w = min(128, 300 - r), min(100, 420 - c)
                tiled[:, r:r + h, c:c + w] = syn.render(scene, (r, c, h, w), time, "uint16", 2)
        assert np.array_equal(whole, tiled), time
    mask = syn.render_mask(scene, (0, 0, 300, 420))
    parts = np.concatenate([syn.render_mask(scene, (0, 0, 77, 420)), syn.render_mask(scene, (77, 0, 223, 420))])
    assert np.array_equal(mask, parts) and mask.any()


@pytest.mark.parametrize("seed", [0, 1, 2, 5])
def test_change_lies_inside_the_mask(seed):
    p = syn.make_pair(256, seed=seed, change_level=0.6)
    m = p.change_mask.astype(bool)
    assert p.change_mask.dtype == np.uint8 and set(np.unique(p.change_mask)) <= {0, 1}
    assert m.any() and p.changes and p.captions[0] not in NO_CHANGE_CAPTIONS
    diff = np.abs(p.before.astype(np.float32) - p.after.astype(np.float32)).mean(0)
    assert diff[m].mean() > 3 * diff[~m].mean()
    for ch in p.changes:
        assert ch["kind"] in ("appeared", "vanished") and ch["object"] in ("building", "road", "vegetation", "water")
        r0, c0, r1, c1 = ch["bbox"]
        assert 0 <= r0 < r1 <= 256 and 0 <= c0 < c1 <= 256


def test_no_change_pair():
    p = syn.make_pair(256, seed=2, change_level=0.0)
    assert not p.change_mask.any() and p.changes == []
    assert p.captions == list(NO_CHANGE_CAPTIONS)
    assert not np.array_equal(p.before, p.after)  # nuisance differences remain
    q = syn.make_pair(256, seed=2, change_level=0.0, nuisance=0.0)
    assert np.array_equal(q.before, q.after)
    r = syn.make_pair(256, seed=2, change_level=1.0, p_no_change=1.0)
    assert not r.change_mask.any() and r.captions == list(NO_CHANGE_CAPTIONS)


def test_uint16_and_extra_bands():
    p = syn.make_pair(96, seed=1, dtype="uint16", extra_bands=2)
    assert p.before.shape == (5, 96, 96) and p.before.dtype == np.uint16 and p.after.shape == (5, 96, 96)
    assert 0 < p.before.min() and p.before.max() <= 10000
    assert not np.array_equal(p.before[3], p.before[0])  # NIR is its own band
    assert syn.make_pair(64, seed=1, extra_bands=4).before.shape == (7, 64, 64)


def test_write_pair_geotiffs(tmp_path):
    files = syn.write_pair(tmp_path, "t", size=(300, 260), seed=5, crs="EPSG:32632", origin=(400000.0, 5100000.0),
                           gsd=0.5, block=256)
    p = syn.make_pair((300, 260), seed=5, gsd=0.5)
    for path, arr, count in ((files.before, p.before, 3), (files.after, p.after, 3), (files.mask, p.change_mask[None], 1)):
        with rasterio.open(path) as ds:
            assert ds.crs.to_epsg() == 32632 and ds.count == count and ds.dtypes[0] == "uint8"
            assert ds.shape == (300, 260) and ds.block_shapes[0] == (256, 256)
            assert ds.transform == rasterio.transform.from_origin(400000.0, 5100000.0, 0.5, 0.5)
            assert ds.compression.value.lower() == "deflate"
            assert np.array_equal(ds.read(), arr)  # block-by-block writing == in-memory rendering
    meta = json.loads(files.captions.read_text())
    assert meta["captions"] == p.captions and len(meta["captions"]) == 5 and meta["seed"] == 5
    assert meta["crs"] == "EPSG:32632" and meta["gsd"] == 0.5 and len(meta["changes"]) == len(p.changes)


def test_write_pair_in_two_crs(tmp_path):
    files = syn.write_pair(tmp_path, "x", size=256, seed=3, dtype="uint16", extra_bands=1,
                           after_crs="EPSG:3857", after_gsd=0.8)
    with rasterio.open(files.before) as b, rasterio.open(files.after) as a, rasterio.open(files.mask) as m:
        assert b.crs.to_epsg() == 32633 and m.crs == b.crs and m.transform == b.transform
        assert a.crs.to_epsg() == 3857 and a.count == 4 and a.dtypes[0] == "uint16" and a.nodata == 0
        assert abs(a.res[0] - 0.8) < 1e-6
        from rasterio.warp import transform_bounds
        ab = transform_bounds(a.crs, b.crs, *a.bounds)
        assert all(abs(x - y) < 5 for x, y in zip(ab, b.bounds))  # same place on the ground
        assert (a.read(1) > 0).mean() > 0.8


def test_cli_writes_pairs(tmp_path):
    syn.main([str(tmp_path), "--size", "96", "--seed", "7", "--count", "2"])
    assert sorted(p.name for p in tmp_path.glob("*_mask.tif")) == ["pair_0007_mask.tif", "pair_0008_mask.tif"]


@pytest.mark.skipif(not VOCAB.exists(), reason="LEVIR-CC vocabulary not available")
def test_captions_use_levircc_vocabulary():
    vocab = set(json.loads(VOCAB.read_text()))
    seen = set()
    for seed in range(40):
        scene = syn.make_scene(256, 256, seed=seed, change_level=[0.0, 0.3, 0.7, 1.0][seed % 4])
        assert len(scene.captions) == 5
        for cap in scene.captions:
            assert cap == cap.lower() and cap == cap.strip() and not cap.endswith(".") and "  " not in cap
            unknown = set(cap.split(" ")) - vocab
            assert not unknown, (seed, cap, unknown)
        seen.add(scene.captions[0])
    assert len(seen) > 10  # captions actually vary with the scene
