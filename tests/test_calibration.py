"""``training calibrate``: a copy of a model file whose 0.5 is the original's threshold, and ``eval --threshold``."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from changescribe.core.model_loading import load_model
from changescribe.training.calibration import calibrate_model_file, change_logit_shift

from conftest import REPO

CARD = REPO / "resources" / "models" / "pix4cap-synthetic.json"


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "changescribe.training", *args], capture_output=True, text=True,
                          cwd=REPO)


@pytest.fixture
def levircd_folder(tmp_path: Path) -> Path:
    """Three 64² pairs in the LEVIR-CD layout: the after image has a brighter square, labelled as change."""
    rng = np.random.default_rng(3)
    root = tmp_path / "crops"
    for sub in ("A", "B", "label"):
        (root / sub).mkdir(parents=True)
    for i in range(3):
        before = rng.integers(60, 120, (64, 64, 3), dtype=np.uint8)
        after = before.copy()
        label = np.zeros((64, 64), np.uint8)
        y, x = 8 + 10 * i, 12 + 6 * i
        after[y:y + 20, x:x + 24] = 220
        label[y:y + 20, x:x + 24] = 255
        Image.fromarray(before).save(root / "A" / f"p{i}.png")
        Image.fromarray(after).save(root / "B" / f"p{i}.png")
        Image.fromarray(label).save(root / "label" / f"p{i}.png")
    return root


def test_shift_moves_the_threshold_to_one_half():
    for t in (0.1, 0.2, 0.5, 0.8):
        assert 1.0 / (1.0 + math.exp(-(math.log(t / (1 - t)) + change_logit_shift(t)))) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="between 0 and 1"):
        change_logit_shift(0.0)


def test_calibrated_probabilities_are_the_shifted_originals(tmp_path):
    out = calibrate_model_file(CARD, 0.3, tmp_path / "cal")
    original, calibrated = load_model(CARD), load_model(out)
    x1, x2 = torch.rand(2, 3, 64, 64) * 255, torch.rand(2, 3, 64, 64) * 255
    with torch.no_grad():
        p = original.predict(x1, x2, with_captions=False).probability.double()
        q = calibrated.predict(x1, x2, with_captions=False).probability.double()
    expected = torch.sigmoid(torch.logit(p.clamp(1e-7, 1 - 1e-7)) + math.log(0.7 / 0.3))
    assert torch.allclose(q, expected, atol=2e-4)
    assert not torch.allclose(q, p, atol=1e-2)  # the shift did something
    card = json.loads(out.read_text())
    assert card["calibration"]["original_threshold"] == pytest.approx(0.3)
    assert card["metrics"] == {} and card["calibration"]["metrics_before"] == json.loads(CARD.read_text())["metrics"]
    assert card["name"] == "pix4cap-synthetic"


def test_calibrations_compose(tmp_path):
    once = calibrate_model_file(CARD, 0.3, tmp_path / "a")
    twice = calibrate_model_file(once, 0.4, tmp_path / "b")
    calibration = json.loads(twice.read_text())["calibration"]
    assert calibration["change_logit_shift"] == pytest.approx(change_logit_shift(0.3) + change_logit_shift(0.4),
                                                              abs=1e-5)
    # the uncalibrated model's metrics survive a second calibration
    assert calibration["metrics_before"] == json.loads(CARD.read_text())["metrics"]


def test_eval_of_the_copy_at_half_equals_eval_of_the_original_at_the_threshold(tmp_path, levircd_folder):
    out = tmp_path / "cal"
    r = _cli("calibrate", str(CARD), "--threshold", "0.3", "--out", str(out), "--device", "cpu")
    assert r.returncode == 0, r.stderr
    scores = []
    for args in ((str(out / "pix4cap-synthetic.json"),), (str(CARD), "--threshold", "0.3")):
        r = _cli("eval", *args, "--data", str(levircd_folder), "--device", "cpu", "--beam-size", "1")
        assert r.returncode == 0, r.stderr
        row = json.loads(r.stdout.splitlines()[-1])
        scores.append({k: row[k] for k in ("Precision", "Recall", "F1", "IoU")})
    assert scores[0] == pytest.approx(scores[1], abs=1e-4)


def test_calibrate_never_overwrites_and_says_so_in_one_line(tmp_path):
    out = tmp_path / "cal"
    calibrate_model_file(CARD, 0.3, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    r = _cli("calibrate", str(CARD), "--threshold", "0.2", "--out", str(out))
    assert r.returncode == 2 and "already there" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing replaced, no leftovers


def test_calibrate_refuses_a_model_without_a_change_classifier(tmp_path):
    shutil.copy(CARD.with_suffix(".safetensors"), tmp_path / "x.safetensors")
    card = json.loads(CARD.read_text())
    card.update(architecture="sen", weights="x.safetensors")
    (tmp_path / "x.json").write_text(json.dumps(card))
    r = _cli("calibrate", str(tmp_path / "x.json"), "--threshold", "0.3", "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "no change classifier to calibrate" in r.stderr and not (tmp_path / "o").exists()


@pytest.mark.parametrize("args, message", [
    (("--threshold", "1.5"), "threshold must be between 0 and 1"),
    ((), "calibrate needs MODEL, --threshold and --out"),
])
def test_bad_thresholds_and_missing_options_are_one_line(tmp_path, args, message):
    r = _cli("calibrate", str(CARD), "--out", str(tmp_path / "o"), *args) if args else _cli("calibrate", str(CARD))
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr
