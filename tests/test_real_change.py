"""The default model's two levers: ImageNet EfficientNet-Lite0 weights from the installed package, and change
synthesised on real imagery (the Joplin tile and its footprints in ../shared/data)."""

from __future__ import annotations

import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

from changescribe.core.models.backbones import (EfficientNetLiteBackbone, build_backbone,
                                                 efficientnet_lite0_weights)

from conftest import REPO, SHARED_DATA

JOPLIN = SHARED_DATA / "joplin_geo"
PRE_TILE = JOPLIN / "raw_tiles" / "pre_tile_337-9136_epsg26915.tif"
FOOTPRINTS = JOPLIN / "joplin_building_footprints.geojson"
needs_joplin = pytest.mark.skipif(not PRE_TILE.is_file(), reason="../shared/data/joplin_geo is not beside the repo")


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a network connection fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_pretrained_weights_come_from_the_installed_package(no_network):
    path = efficientnet_lite0_weights()
    assert "site-packages" in str(path) and path.name.startswith("efficientnet-lite0-")
    net = build_backbone("efficientnet-lite0", stages=4)
    net.load_pretrained("imagenet")
    state = torch.load(path, map_location="cpu", weights_only=True)
    own = net.state_dict()
    assert own["_blocks.10._depthwise_conv.weight"].equal(state["_blocks.10._depthwise_conv.weight"])
    assert own["_bn0.running_var"].equal(state["_bn0.running_var"])
    # every tensor of the kept blocks comes from the file, none stays at its initial value
    assert all(own[k].equal(state[k]) for k in own)


def test_lite0_matches_the_reference_implementation(no_network):
    """Our EfficientNet-Lite0 gives the reference package's block outputs exactly (TF 'SAME' padding, ReLU6)."""
    ref_pkg = pytest.importorskip("efficientnet_lite_pytorch")
    ref = ref_pkg.EfficientNet.from_pretrained("efficientnet-lite0", weights_path=str(efficientnet_lite0_weights()))
    ref.eval()
    ours = build_backbone("efficientnet-lite0", stages=4).eval()
    ours.load_pretrained("imagenet")
    x = torch.randn(2, 3, 96, 128)
    with torch.no_grad():
        feats = ours(x)
        y = ref._swish(ref._bn0(ref._conv_stem(x)))
        expected = []
        for i, block in enumerate(ref._blocks):
            y = block(y)
            if i in (2, 4, 10, 15):
                expected.append(y)
    assert [tuple(f.shape[1:]) for f in feats] == [(24, 24, 32), (40, 12, 16), (112, 6, 8), (320, 3, 4)]
    for a, b in zip(feats, expected):
        assert torch.allclose(a, b, atol=1e-5)


def test_frozen_blocks_keep_imagenet_statistics_while_training():
    net = EfficientNetLiteBackbone(stages=3, frozen=8)
    net.load_pretrained(efficientnet_lite0_weights())
    before = net._blocks[3]._bn1.running_mean.clone()
    net.train()
    net(torch.randn(2, 3, 64, 64) * 3)
    assert net._blocks[3]._bn1.running_mean.equal(before)
    assert not any(p.requires_grad for p in net._blocks[7].parameters())
    assert all(p.requires_grad for p in net._blocks[8].parameters())


def test_missing_package_weights_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="weights lack"):
        torch.save({"_conv_stem.weight": torch.zeros(32, 3, 3, 3)}, tmp_path / "w.pth")
        EfficientNetLiteBackbone(stages=2).load_pretrained(tmp_path / "w.pth")


# ---- synthesis on real imagery -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def scenes():
    from changescribe.training.datasets.real_change import load_real_scenes

    if not PRE_TILE.is_file():
        pytest.skip("../shared/data/joplin_geo is not beside the repo")
    return load_real_scenes([{"image": str(PRE_TILE), "footprints": str(FOOTPRINTS)}],
                            [str(SHARED_DATA / "levircc" / "A")])


def _kind(item: dict) -> str:
    return item["name"].split("_")[2]


def _arrays(item: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return (item["before"].numpy().transpose(1, 2, 0).astype(int), item["after"].numpy().transpose(1, 2, 0).astype(int),
            item["mask"].numpy().astype(bool))


@needs_joplin
def test_footprints_cut_real_objects(scenes):
    assert len(scenes.objects) > 100  # ~170 footprints on the tile, minus those cut by its edge
    obj = scenes.objects[0]
    assert obj.mask.any() and obj.image.shape[:2] == obj.mask.shape
    # footprints land on the buildings: roofs differ from the ground around them
    assert abs(obj.image[obj.mask].mean() - obj.image[~obj.mask].mean()) > 3


@needs_joplin
def test_a_pasted_or_removed_object_is_exactly_its_label(scenes):
    from changescribe.training.datasets.real_change import RealChangeDataset, SynthesisConfig

    cfg = SynthesisConfig(p_land=0, p_site=0, p_fill=0, p_shift=0, p_shadow=0, nuisance=0)
    ds = RealChangeDataset(scenes, 60, 128, seed=7, config=cfg)
    seen = set()
    for i in range(len(ds)):
        item = ds[i]
        before, after, label = _arrays(item)
        changed = (before != after).any(-1)
        kind = _kind(item)
        seen.add(kind)
        if kind in ("new", "removed", "both") and label.any():
            assert not (changed & ~label).any(), f"{item['name']}: pixels changed outside the label"
            assert changed[label].mean() > 0.9, f"{item['name']}: labelled pixels did not change"
            holder = after if kind == "new" else before
            other = before if kind == "new" else after
            assert (holder[label] != other[label]).any()
    assert {"new", "removed", "both"} <= seen


@needs_joplin
def test_geometry_is_identical_in_both_dates_under_photometric_nuisances(scenes):
    """Without simulated misregistration, the two dates line up at zero shift, whatever the light and colour."""
    from changescribe.training.datasets.real_change import RealChangeDataset, SynthesisConfig

    ds = RealChangeDataset(scenes, 12, 128, seed=3, config=SynthesisConfig(p_shift=0, p_land=0, p_fill=0,
                                                                            p_star=0))
    for i in range(len(ds)):
        before, after, label = _arrays(ds[i])
        a, b = before.mean(-1), after.mean(-1)
        a, b = a - a.mean(), b - b.mean()
        scores = {}
        for dy in (-2, 0, 2):
            for dx in (-2, 0, 2):
                shifted = np.roll(b, (dy, dx), (0, 1))[4:-4, 4:-4]
                scores[(dy, dx)] = float((a[4:-4, 4:-4] * shifted).sum())
        assert max(scores, key=scores.get) == (0, 0)


@needs_joplin
def test_nuisance_only_pairs_have_an_empty_label(scenes):
    from changescribe.training.datasets.real_change import RealChangeDataset, SynthesisConfig

    ds = RealChangeDataset(scenes, 40, 128, seed=11, config=SynthesisConfig(p_new=0, p_removed=0, p_both=0, p_star=0,
                                                                             p_land=1.0, p_fill=0.5))
    for i in range(len(ds)):
        item = ds[i]
        before, after, label = _arrays(item)
        assert _kind(item) == "none" and not label.any()
        assert item["captions"][0] == "there is no difference"
        assert (before != after).any()  # the nuisances did change pixels


@needs_joplin
def test_fill_strips_are_never_labelled(scenes):
    from changescribe.training.datasets.real_change import RealChangeDataset, SynthesisConfig

    ds = RealChangeDataset(scenes, 30, 128, seed=5, config=SynthesisConfig(p_fill=1.0, nuisance=0, p_shift=0))
    strips = 0
    for i in range(len(ds)):
        before, after, label = _arrays(ds[i])
        for img in (before, after):
            for v in (0, 255):
                fill = (img == v).all(-1)
                for edge in (fill[:, 0], fill[:, -1], fill[0, :], fill[-1, :]):
                    if edge.all():
                        strips += 1
                        assert not label[fill].any()
    assert strips >= 25


def test_eval_scores_a_real_folder_and_says_what_it_scored():
    card = REPO / "resources" / "models" / "pix4cap-lite-real.json"
    data = SHARED_DATA / "levircd_256"
    if not data.is_dir():
        pytest.skip("../shared/data is not beside the repo")
    r = subprocess.run([sys.executable, "-m", "changescribe.training", "eval", str(card), "--data", str(data),
                        "--device", "cpu", "--beam-size", "1"], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr
    first = r.stdout.splitlines()[0]
    assert first.startswith("scored: LEVIR-CD layout") and first.endswith(": 4 pairs"), first
    assert "| Precision | Recall | F1 | IoU | OA |" in r.stdout
    assert "synthetic" not in r.stdout and "generated" not in r.stdout


@pytest.mark.parametrize("extra, message", [
    (["--pairs", "50"], "--pairs counts generated test scenes"),
    (["--out", "x"], "eval does not use --out"),
    (["--config", "training/configs/pix4cap_lite_real.json"], "not both"),
])
def test_eval_refuses_options_it_would_ignore(extra, message):
    card = REPO / "resources" / "models" / "pix4cap-lite-real.json"
    r = subprocess.run([sys.executable, "-m", "changescribe.training", "eval", str(card), "--data",
                        str(SHARED_DATA / "levircd_256"), *extra], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr


def test_eval_on_a_folder_of_neither_layout_is_one_line(tmp_path):
    card = REPO / "resources" / "models" / "pix4cap-lite-real.json"
    r = subprocess.run([sys.executable, "-m", "changescribe.training", "eval", str(card), "--data", str(tmp_path),
                        "--device", "cpu"], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 2 and "neither the LEVIR-CD layout" in r.stderr and "Traceback" not in r.stderr


def test_star_captions_say_which_kind_dominates():
    from changescribe.training.datasets.real_change import captions_for

    label = np.zeros((64, 64), bool)
    label[5:20, 5:20] = True
    assert all("removed" in c or "disappear" in c for c in captions_for("star", 225, 1, label, removed=5))
    assert all("built" in c or "constructed" in c for c in captions_for("star", 225, 6, label, removed=1))
    mixed = captions_for("star", 225, 3, label, removed=3)
    assert all("built" in c and "removed" in c for c in mixed)
    assert captions_for("new", 0, 0, np.zeros((8, 8), bool))[0] == "there is no difference"
