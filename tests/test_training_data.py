"""training/datasets: LEVIR-CC / LEVIR-MCI / LEVIR-CD readers on trees in the official layouts, the real samples in
shared/data, and bi-temporal augmentations (one geometry for both dates and the mask, one light per date)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from changescribe.training.config import AugmentConfig, DataConfig, load_config
from changescribe.training.datasets import build_dataset, collate
from changescribe.training.datasets.augment import AugmentedDataset, BiTemporalAugment, check_for_captions
from changescribe.training.datasets.levir import (LevirCCDataset, LevirCDDataset, LevirMCIDataset, read_captions,
                                                  split_counts)

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared" / "data"
CAPTIONS = ["a house is built on the left", "a new building appears on the left side",
            "there is a new house", "a building is constructed", "a house appears"]
NO_CHANGE = ["there is no difference"] * 5


def _png(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def write_levircc(root: Path, pairs: dict[str, int], size: int = 32, labels: bool = False,
                  converted: bool = False) -> Path:
    """Official LEVIR-CC layout: images/<split>/{A,B}[/label]/<split>_NNNNNN.png + LevirCCcaptions.json."""
    rng = np.random.default_rng(0)
    records, sentid = [], 0
    for split, n in pairs.items():
        for i in range(n):
            name = f"{split}_{i:06d}.png"
            before = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            after = before.copy()
            changed = i % 2 == 0
            label = np.zeros((size, size), np.uint8)
            if changed:
                after[4:12, 4:12] = 255
                label[4:12, 4:12] = 2  # LEVIR-MCI: a building
                label[20:24, :] = 1    # and a road
            _png(root / "images" / split / "A" / name, before)
            _png(root / "images" / split / "B" / name, after)
            if labels:
                _png(root / "images" / split / "label" / name, label)
            caps = CAPTIONS if changed else NO_CHANGE
            if converted:
                sentences = list(caps)
            else:
                sentences = [{"tokens": c.split(), "raw": f" {c} .", "imgid": len(records), "sentid": sentid + k}
                             for k, c in enumerate(caps)]
            records.append({"filepath": split, "filename": name, "imgid": len(records), "split": split,
                            "sentences": sentences, "changeflag": int(changed),
                            "sentids": list(range(sentid, sentid + 5))})
            sentid += 5
    (root / "LevirCCcaptions.json").write_text(json.dumps({"images": records, "dataset": "LEVIR-CC"}))
    return root


def test_levircc_official_layout(tmp_path):
    root = write_levircc(tmp_path / "LEVIR-CC", {"train": 3, "val": 1, "test": 1})
    assert split_counts(read_captions(root / "LevirCCcaptions.json")) == {"train": 3, "val": 1, "test": 1}
    ds = LevirCCDataset(root, "train")
    assert len(ds) == 3
    item = ds[0]
    assert item["before"].dtype == torch.uint8 and item["before"].shape == (3, 32, 32)
    assert item["after"].shape == (3, 32, 32) and not torch.equal(item["before"], item["after"])
    assert item["captions"] == CAPTIONS and item["name"] == "train_000000"
    assert item["mask"].shape == (32, 32) and bool((item["mask"] == 255).all())  # no masks: unlabelled
    assert ds[1]["captions"] == NO_CHANGE
    batch = collate([ds[0], ds[1]])
    assert batch["before"].shape == (2, 3, 32, 32) and batch["mask"].shape == (2, 32, 32)
    assert batch["captions"][1] == NO_CHANGE and batch["name"] == ["train_000000", "train_000001"]


def test_levircc_converted_captions_and_missing_images(tmp_path):
    root = write_levircc(tmp_path / "cc", {"train": 2, "val": 1}, converted=True)
    ds = LevirCCDataset(root, "val")
    assert len(ds) == 1 and ds[0]["captions"] == CAPTIONS
    (root / "images" / "train" / "B" / "train_000001.png").unlink()
    with pytest.raises(FileNotFoundError, match="train_000001"):
        LevirCCDataset(root, "train")
    assert len(LevirCCDataset(root, "train", missing="skip")) == 1


def test_levirmci_labels_are_binary_with_the_class_map_kept(tmp_path):
    root = write_levircc(tmp_path / "mci", {"train": 2, "val": 1}, labels=True)
    ds = LevirMCIDataset(root, "train")
    item = ds[0]
    assert set(torch.unique(item["classes"]).tolist()) == {0, 1, 2}
    assert set(torch.unique(item["mask"]).tolist()) == {0, 1}
    assert torch.equal(item["mask"], (item["classes"] > 0).to(torch.uint8))
    assert int(ds[1]["mask"].sum()) == 0 and ds[1]["captions"] == NO_CHANGE
    cfg = DataConfig(source="levirmci", root=str(root))
    assert len(build_dataset(cfg, "train", train=True)) == 2


def test_levircd_layout_cut_into_crops(tmp_path):
    rng = np.random.default_rng(1)
    for split, n in (("train", 2), ("val", 1)):
        for i in range(n):
            img = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
            label = np.zeros((64, 64), np.uint8)
            label[32:, 32:] = 255  # change only in the bottom-right quarter
            _png(tmp_path / "cd" / split / "A" / f"{split}_{i + 1}.png", img)
            _png(tmp_path / "cd" / split / "B" / f"{split}_{i + 1}.png", img[::-1].copy())
            _png(tmp_path / "cd" / split / "label" / f"{split}_{i + 1}.png", label)
    ds = LevirCDDataset(tmp_path / "cd", "train", crop_size=32)
    assert len(ds) == 8
    assert [ds[k]["name"] for k in range(4)] == ["train_1_0000_0000", "train_1_0000_0032", "train_1_0032_0000",
                                                 "train_1_0032_0032"]
    assert [int(ds[k]["mask"].sum()) for k in range(4)] == [0, 0, 0, 32 * 32]
    whole = np.asarray(Image.open(tmp_path / "cd" / "train" / "A" / "train_1.png")).transpose(2, 0, 1)
    assert torch.equal(ds[1]["before"], torch.from_numpy(whole[:, :32, 32:].copy()))
    assert ds[0]["captions"] == [] and ds[0]["mask"].dtype == torch.uint8
    assert len(LevirCDDataset(tmp_path / "cd", "val", crop_size=None)) == 1
    cfg = DataConfig(source="levircd", root=str(tmp_path / "cd"), crop_size=32, limit=3)
    assert len(build_dataset(cfg, "train")) == 3


@pytest.mark.skipif(not (SHARED / "levircd_256" / "A").is_dir(), reason="shared/data/levircd_256 not present")
def test_real_levircd_crops():
    ds = LevirCDDataset(SHARED / "levircd_256", split=None, crop_size=256)
    names = [ds[i]["name"] for i in range(len(ds))]
    assert names == ["train_36_0512_0512", "train_386_0512_0768", "train_412_0512_0768", "val_27_0000_0256"]
    for i in range(len(ds)):
        item = ds[i]
        assert item["before"].shape == item["after"].shape == (3, 256, 256)
        assert set(torch.unique(item["mask"]).tolist()) <= {0, 1}
    assert int(ds[1]["mask"].sum()) == 0 and int(ds[0]["mask"].sum()) > 0  # train_386 has no change
    assert len(LevirCDDataset(SHARED / "levircd_256", split=None, crop_size=128)) == 16


@pytest.mark.skipif(not (SHARED / "levircc_captions.json").is_file(), reason="shared/data not present")
def test_real_levircc_captions_and_sample_pairs():
    records = read_captions(SHARED / "levircc_captions.json")
    assert split_counts(records) == {"train": 6815, "val": 1333, "test": 1929}
    assert all(len(r.captions) == 5 for r in records)
    ds = LevirCCDataset(SHARED / "levircc", "train", SHARED / "levircc_captions.json", missing="skip")
    assert ds.names == ["train_000016.png", "train_000051.png", "train_000054.png"]
    item = ds[0]
    assert item["before"].shape == (3, 256, 256) and len(item["captions"]) == 5


def _pattern(seed: int = 0, size: int = 16) -> dict:
    g = torch.Generator().manual_seed(seed)
    img = torch.randint(0, 256, (3, size, size), generator=g, dtype=torch.uint8)
    return {"before": img, "after": img.clone(), "mask": (img[0] > 128).to(torch.uint8),
            "classes": (img[1] > 128).to(torch.uint8) * 2, "captions": ["x"], "name": "p"}


def test_geometric_augmentation_is_the_same_on_both_dates_and_the_mask():
    aug = BiTemporalAugment(AugmentConfig(geometric=True), torch.Generator().manual_seed(3))
    item = _pattern()
    seen = set()
    for _ in range(24):
        out = aug(item)
        assert torch.equal(out["before"], out["after"])
        assert torch.equal(out["mask"], (out["before"][0] > 128).to(torch.uint8))
        assert torch.equal(out["classes"], (out["before"][1] > 128).to(torch.uint8) * 2)
        seen.add(out["before"].numpy().tobytes())
    assert len(seen) >= 5  # several of the 8 symmetries of the square were drawn
    assert torch.equal(item["before"], _pattern()["before"])  # the input is not modified


def test_photometric_jitter_differs_per_date_and_leaves_the_mask():
    aug = BiTemporalAugment(AugmentConfig(photometric=True, brightness=0.2, contrast=0.2, saturation=0.2,
                                          hue=0.05), torch.Generator().manual_seed(0))
    item = _pattern(size=32)
    out = aug(item)
    assert out["before"].dtype == torch.uint8 and out["before"].shape == item["before"].shape
    assert not torch.equal(out["before"], out["after"])
    assert not torch.equal(out["before"], item["before"])
    assert torch.equal(out["mask"], item["mask"])


def _blocks(size: int = 64, seed: int = 0) -> dict:
    """Blocks of 8 px: a mask whose changed blocks are bright in the images, plus an unlabelled block."""
    g = torch.Generator().manual_seed(seed)
    cells = torch.rand(size // 8, size // 8, generator=g) > 0.5
    mask = cells.repeat_interleave(8, 0).repeat_interleave(8, 1).to(torch.uint8)
    img = (mask * 200 + 20).to(torch.uint8)[None].repeat(3, 1, 1)
    mask[:8, :8] = 255  # unlabelled pixels
    return {"before": img, "after": img.clone(), "mask": mask, "classes": mask.clone(), "captions": ["x"],
            "name": "b"}


def test_random_resized_crop_is_the_same_on_both_dates_and_the_mask():
    aug = BiTemporalAugment(AugmentConfig(crop=True, crop_scale=(0.4, 0.9)), torch.Generator().manual_seed(1))
    item = _blocks()
    seen = set()
    for _ in range(12):
        out = aug(item)
        assert out["before"].shape == (3, 64, 64) and out["before"].dtype == torch.uint8
        assert out["mask"].shape == (64, 64) and out["mask"].dtype == torch.uint8
        assert torch.equal(out["before"], out["after"])  # one window for both dates
        assert set(out["mask"].unique().tolist()) <= {0, 1, 255}  # nearest: labels stay labels
        assert torch.equal(out["classes"], out["mask"])
        labelled = out["mask"] != 255
        bright = out["before"][0] > 120
        # the images' blocks sit where the mask's do (measured >= 0.997; plain nearest, half a pixel off: 0.95)
        agree = (bright == out["mask"].bool())[labelled].float().mean()
        assert agree > 0.99, float(agree)
        seen.add(out["mask"].numpy().tobytes())
    assert len(seen) >= 10 and not torch.equal(out["mask"], item["mask"])  # windows vary, and they zoom
    assert torch.equal(item["mask"], _blocks()["mask"])  # the input is not modified
    with pytest.raises(ValueError, match="crop_scale"):
        BiTemporalAugment(AugmentConfig(crop=True, crop_scale=(0.5, 1.5)))(item)


def test_gaussian_blur_changes_the_images_not_the_mask():
    item = _blocks(seed=2)
    out = BiTemporalAugment(AugmentConfig(blur=True, blur_sigma=(0.8, 1.0)), torch.Generator().manual_seed(0))(item)
    assert not torch.equal(out["before"], item["before"]) and torch.equal(out["mask"], item["mask"])
    assert torch.equal(out["before"], out["after"])  # BIT: one sigma for the pair
    # a blur: edges soften, flat areas and the mean stay
    assert out["before"].float().mean().sub(item["before"].float().mean()).abs() < 1.0
    grad = lambda x: x[0].float().diff(dim=-1).abs().max()  # noqa: E731
    assert grad(out["before"]) < grad(item["before"])
    per_date = BiTemporalAugment(AugmentConfig(blur=True, blur_sigma=(0.3, 1.0), blur_per_date=True),
                                 torch.Generator().manual_seed(0))(item)
    assert not torch.equal(per_date["before"], per_date["after"]) and torch.equal(per_date["mask"], item["mask"])
    # captions: blur is fine, a crop is refused
    check_for_captions(AugmentConfig(blur=True), "pix4cap")
    with pytest.raises(ValueError, match="crop"):
        check_for_captions(AugmentConfig(crop=True), "pix4cap")


def test_time_swap_and_its_refusal_for_captions():
    item = _pattern()
    item["after"] = 255 - item["after"]
    out = BiTemporalAugment(AugmentConfig(time_swap=1.0))(item)
    assert torch.equal(out["before"], item["after"]) and torch.equal(out["after"], item["before"])
    with pytest.raises(ValueError, match="time_swap"):
        check_for_captions(AugmentConfig(time_swap=0.5), "pix4cap")
    check_for_captions(AugmentConfig(geometric=True, photometric=True), "pix4cap")
    assert not BiTemporalAugment(AugmentConfig()).enabled


def test_training_splits_get_augmentations_validation_does_not(tmp_path):
    root = write_levircc(tmp_path / "cc", {"train": 2, "val": 1})
    cfg = DataConfig(source="levircc", root=str(root), augment=AugmentConfig(photometric=True))
    train = build_dataset(cfg, "train", train=True)
    assert isinstance(train, AugmentedDataset) and len(train.captions) == 2
    assert isinstance(build_dataset(cfg, "val"), LevirCCDataset)


def test_configs_parse_with_nested_augment_and_reject_typos(tmp_path):
    for path in sorted((REPO / "training" / "configs").glob("*.json")):
        load_config(path)
    cfg = load_config(REPO / "training" / "configs" / "bit_cd_levircd.json", {"data.augment.hue": 0.0})
    assert cfg.data.augment.geometric and cfg.data.augment.hue == 0.0 and cfg.optim.momentum == 0.99
    bad = tmp_path / "bad.json"
    bad.write_text('{"data": {"augment": {"flip": true}}}')
    with pytest.raises(ValueError, match="flip"):
        load_config(bad)
