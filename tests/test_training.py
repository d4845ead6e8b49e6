"""training/: the Pix4Cap recipe runs, resumes and exports a model file the pipeline then runs; metrics are right."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from changescribe.core.pipeline import detect_changes
from changescribe.training.synthetic import write_pair
from changescribe.training.config import load_config
from changescribe.training.metrics import MaskScores, caption_scores
from changescribe.training.recipes.pix4cap import train

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "training" / "configs" / "pix4cap_synthetic.json"
TINY = {"data.train_pairs": 8, "data.val_pairs": 4, "data.size": 64, "tile_size": 64, "optim.batch_size": 4,
        "optim.epochs": 1, "vocabulary.path": str(REPO.parent / "shared" / "data" / "levircc_captions.json")}


def test_recipe_short_epoch_exports_a_model_the_pipeline_runs(tmp_path):
    cfg = load_config(CONFIG, {**TINY, "model_name": "tiny-test"})
    card = train(cfg, tmp_path / "run", device="cpu")
    assert card.name == "tiny-test.json" and card.with_suffix(".safetensors").exists()
    log = (tmp_path / "run" / "log.csv").read_text().splitlines()
    assert log[0].startswith("epoch,step,loss") and len(log) == 2
    pair = write_pair(tmp_path / "pair", "p", size=160, seed=123)
    result = detect_changes(pair.before, pair.after, str(card), tmp_path / "r.gpkg")
    assert result.output.exists() and result.metadata["model"]["name"] == "tiny-test"
    assert isinstance(result.scene_caption, str) and result.scene_caption


def test_resume_continues_from_the_checkpoint(tmp_path):
    cfg = load_config(CONFIG, {**TINY, "optim.epochs": 2, "model_name": "resume-test"})
    run = tmp_path / "run"
    cfg_one = load_config(CONFIG, {**TINY, "optim.epochs": 1, "model_name": "resume-test"})
    train(cfg_one, run, device="cpu")
    state_after_one = torch.load(run / "last.pt", weights_only=True)
    assert state_after_one["epoch"] == 0
    train(cfg, run, device="cpu", resume=True)
    state = torch.load(run / "last.pt", weights_only=True)
    assert state["epoch"] == 1 and state["step"] == 2 * state_after_one["step"]
    rows = (run / "log.csv").read_text().splitlines()[1:]
    assert [r.split(",")[0] for r in rows] == ["1", "2"]


def test_config_rejects_unknown_keys(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"optim": {"learning_rate": 1}}')
    with pytest.raises(ValueError, match="learning_rate"):
        load_config(bad)


def test_caption_metrics_known_values():
    refs = [["a house is built on the left", "a building appears on the left side"],
            ["there is no difference", "the two scenes seem identical"]]
    same = caption_scores(refs, ["a house is built on the left", "there is no difference"], meteor=False)
    assert same["BLEU-4"] == pytest.approx(1.0, abs=1e-6)
    assert same["ROUGE-L"] == pytest.approx(1.0, abs=1e-6)
    wrong = caption_scores(refs, ["many trees are removed", "a road is built at the top"], meteor=False)
    assert wrong["BLEU-4"] < 0.01 and wrong["CIDEr-D"] < same["CIDEr-D"]


def test_mask_metrics_on_hand_made_masks():
    truth = torch.zeros(1, 4, 4, dtype=torch.long)
    truth[0, :2, :2] = 1  # 4 changed pixels
    prob = torch.zeros(1, 4, 4)
    prob[0, :2, :1] = 0.9   # 2 true positives
    prob[0, 3, 3] = 0.8     # 1 false positive
    m = MaskScores()
    m.update(prob, truth)
    s = m.compute()
    assert s["Precision"] == pytest.approx(2 / 3)
    assert s["Recall"] == pytest.approx(0.5)
    assert s["IoU"] == pytest.approx(2 / 5)
    assert s["F1"] == pytest.approx(2 * (2 / 3) * 0.5 / (2 / 3 + 0.5))
    assert s["OA"] == pytest.approx(13 / 16)
    assert np.isfinite(list(s.values())).all()
