"""training/engine.py and the recipes on it: exact resume, DDP with two gloo processes, gradient accumulation,
the bit-cd recipe end to end through the pipeline, and the Pix4Cap pseudo-label step feeding pix4cap."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from changescribe.core.model_api import InputSpec
from changescribe.core.model_file import read_card, save_model_file
from changescribe.core.models.registry import build_model, get_entry
from changescribe.core.pipeline import detect_changes
from changescribe.training.synthetic import make_pair, write_pair
from changescribe.training.config import load_config
from changescribe.training.engine import amp_dtype, epoch_seed
from changescribe.training.pseudo_labels import write_pseudo_labels
from changescribe.training.recipes import bit_cd, pix4cap

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "training" / "configs"
# A small BIT: one decoder layer, 16 feature channels; 32-64 px pairs keep every run to seconds on a busy CPU.
TINY_BIT = {"data.train_pairs": 8, "data.val_pairs": 2, "data.size": 32, "tile_size": 32, "optim.batch_size": 4,
            "optim.epochs": 1, "config_overrides": {"dec_depth": 1, "feature_dim": 16}, "log.tensorboard": False,
            "log.plot": False}


def _rows(run: Path) -> list[dict]:
    with (run / "log.csv").open() as f:
        return list(csv.DictReader(f))


def test_two_epochs_equal_one_epoch_plus_resume(tmp_path):
    # Augmentations on (flips, jitter, time swap) and a linear schedule: everything random must resume exactly.
    over = {**TINY_BIT, "optim.epochs": 2}
    cfg = load_config(CONFIGS / "bit_cd_synthetic.json", over)
    bit_cd.train(cfg, tmp_path / "straight")
    # the same run interrupted after its first epoch (max_steps = one epoch), then resumed
    bit_cd.train(load_config(CONFIGS / "bit_cd_synthetic.json", {**over, "optim.max_steps": 2}), tmp_path / "resumed")
    assert torch.load(tmp_path / "resumed" / "last.pt", weights_only=True)["epoch"] == 0
    bit_cd.train(cfg, tmp_path / "resumed", resume=True)
    a = torch.load(tmp_path / "straight" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "last.pt", weights_only=True)
    assert a["epoch"] == b["epoch"] == 1 and a["step"] == b["step"] == 4
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert [r["epoch"] for r in _rows(tmp_path / "resumed")] == ["1", "2"]
    assert _rows(tmp_path / "straight")[1]["loss"] == _rows(tmp_path / "resumed")[1]["loss"]


def test_bit_cd_short_epoch_exports_a_model_the_pipeline_runs(tmp_path):
    cfg = load_config(CONFIGS / "bit_cd_synthetic.json",
                      {**TINY_BIT, "data.size": 64, "tile_size": 64, "optim.batch_size": 2, "optim.accumulate": 2,
                       "log.plot": True, "model_name": "bit-tiny-test"})
    card = bit_cd.train(cfg, tmp_path / "run")
    rows = _rows(tmp_path / "run")
    assert len(rows) == 1 and rows[0]["step"] == "2"  # 8 pairs / batch 2 = 4 batches = 2 accumulated steps
    assert {"loss_ce", "loss_dice", "val_F1", "val_IoU", "val_OA"} <= set(rows[0])
    assert (tmp_path / "run" / "curves.png").stat().st_size > 0
    c = read_card(card)
    assert c["architecture"] == "bit-cd" and c["vocabulary"] is None
    assert {"Precision", "Recall", "F1", "IoU", "OA"} <= set(c["metrics"])
    assert c["training"]["git_revision"] and c["training"]["steps"] == 2 and c["training"]["processes"] == 1
    assert c["recipe"]["optim"]["momentum"] == 0.99 and c["data"]["source"] == "synthetic"
    pair = write_pair(tmp_path / "pair", "p", size=96, seed=7)
    result = detect_changes(pair.before, pair.after, str(card), tmp_path / "r.gpkg", device="cpu")
    assert result.output.exists() and result.metadata["model"]["captions"] is False
    assert result.scene_caption == result.summary


def test_ddp_two_cpu_processes(tmp_path):
    out = tmp_path / "ddp"
    args = [sys.executable, "-m", "changescribe.training", "bit-cd", "--config", str(CONFIGS / "bit_cd_synthetic.json"),
            "--out", str(out), "--device", "cpu", "--ddp", "--nproc", "2"]
    for k, v in {**TINY_BIT, "data.train_pairs": 16, "model_name": "bit-ddp"}.items():
        args += ["--set", f"{k}={json.dumps(v)}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(args, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text[-3000:]
    assert "[rank 0/2] finished: 2 optimizer steps" in text and "[rank 1/2] finished: 2 optimizer steps" in text
    card = read_card(out / "bit-ddp.json")  # written by rank 0 alone
    assert card["training"]["processes"] == 2 and card["training"]["effective_batch_size"] == 8
    assert len(_rows(out)) == 1 and sorted(p.name for p in out.glob("*.pt")) == ["best.pt", "last.pt"]


def test_amp_and_seeds():
    assert amp_dtype("auto", torch.device("cpu")) is None and amp_dtype("bf16", torch.device("cpu")) is None
    with pytest.raises(ValueError):
        amp_dtype("fp8", torch.device("cpu"))
    assert epoch_seed(42, 0) != epoch_seed(42, 1) != epoch_seed(42, 1, rank=1)
    assert epoch_seed(42, 3) == epoch_seed(42, 3)


def write_levircc(root: Path, pairs: dict[str, int], size: int = 64) -> Path:
    """A LEVIR-CC tree in the official layout from synthetic pairs (real-looking content, real captions)."""
    records, seed = [], 100
    for split, n in pairs.items():
        for i in range(n):
            name = f"{split}_{i:06d}.png"
            p = make_pair(size, seed=seed, p_no_change=0.3)
            seed += 1
            for folder, img in (("A", p.before), ("B", p.after)):
                (root / "images" / split / folder).mkdir(parents=True, exist_ok=True)
                Image.fromarray(np.ascontiguousarray(img[:3].transpose(1, 2, 0))).save(
                    root / "images" / split / folder / name)
            records.append({"filepath": split, "filename": name, "split": split, "imgid": len(records),
                            "changeflag": int(p.change_mask.any()),
                            "sentences": [{"tokens": c.split(), "raw": f" {c} ."} for c in p.captions]})
    (root / "LevirCCcaptions.json").write_text(json.dumps({"images": records}))
    return root


def test_pseudo_labels_resume_and_feed_pix4cap(tmp_path):
    root = write_levircc(tmp_path / "LEVIR-CC", {"train": 3, "val": 1, "test": 1})
    spec = InputSpec(tile_size=64)
    module, cfg = build_model("bit-cd", {**vars(get_entry("bit-cd").config), "dec_depth": 1, "feature_dim": 16},
                              input_spec=spec)
    card = save_model_file(tmp_path / "cd" / "bit-untrained", module, "bit-cd", cfg, spec)
    out = tmp_path / "pseudo"
    first = write_pseudo_labels(card, root, out, batch_size=2, progress=False)
    assert first == {"train": {"written": 3, "skipped": 0}, "val": {"written": 1, "skipped": 0},
                     "test": {"written": 1, "skipped": 0}}
    masks = sorted(out.glob("*/*.png"))
    assert [str(p.relative_to(out)) for p in masks] == [
        "test/test_000000.png", "train/train_000000.png", "train/train_000001.png", "train/train_000002.png",
        "val/val_000000.png"]
    arr = np.asarray(Image.open(masks[1]))
    assert arr.shape == (64, 64) and arr.dtype == np.uint8 and set(np.unique(arr)) <= {0, 255}
    stamp = masks[1].stat().st_mtime_ns
    (out / "val" / "val_000000.png").unlink()  # as if interrupted before this one
    second = write_pseudo_labels(card, root, out, batch_size=2, progress=False)
    assert second == {"train": {"written": 0, "skipped": 3}, "val": {"written": 1, "skipped": 0},
                      "test": {"written": 0, "skipped": 1}}
    assert masks[1].stat().st_mtime_ns == stamp
    third = write_pseudo_labels(card, root, out, progress=False)
    assert all(v["written"] == 0 for v in third.values())

    # pix4cap trains one step on LEVIR-CC + those pseudo-labels
    cfg = load_config(CONFIGS / "pix4cap_levircc.json", {
        "architecture": "pix4cap-tiny", "model_name": "p4c-levircc-test", "tile_size": 64,
        "data.root": str(root), "data.pseudo_labels": str(out), "vocabulary.min_count": 1,
        "optim.batch_size": 2, "optim.epochs": 1, "optim.max_steps": 1, "optim.num_workers": 0,
        "log.tensorboard": False, "log.plot": False})
    p4c = pix4cap.train(cfg, tmp_path / "p4c")
    rows = _rows(tmp_path / "p4c")
    assert len(rows) == 1 and rows[0]["step"] == "1" and float(rows[0]["loss_det"]) > 0
    c = read_card(p4c)
    assert c["vocabulary"] and "pseudo-labels" in c["training_data"] and c["data"]["source"] == "levircc"
    assert "BLEU-4" in c["metrics"] and "IoU" in c["metrics"]


def test_pix4cap_refuses_time_swap(tmp_path):
    cfg = load_config(CONFIGS / "pix4cap_synthetic.json", {"data.augment.time_swap": 0.5})
    with pytest.raises(ValueError, match="time_swap"):
        pix4cap.train(cfg, tmp_path / "x")
