"""What a model card's summary says about its metrics: which data each figure comes from (issue 14.3)."""

from __future__ import annotations

import json
import subprocess
import sys

from changescribe.core.model_card import GENERATED, card_summary, data_label, metric_lines, summary_metrics
from changescribe.core.model_loading import installed_models

NEW_CARD = {
    "name": "m", "vocabulary": ["a"], "input": {"gsd": 0.5, "tile_size": 256},
    "weights_terms": "research use only: trained on LEVIR-CD imagery",
    "metrics": {
        "synthetic": {"data": GENERATED, "split": "held-out generated pairs", "pairs": 200, "F1": 0.861,
                      "BLEU-4": 0.61},
        "real": {"data": "real crops (LEVIR-CD, DSIFN)", "split": "LEVIR-CD test, DSIFN test", "pairs": 128,
                 "F1": 0.714, "Precision": 0.7},
    },
}


def test_summary_names_the_data_real_first_and_the_terms():
    assert summary_metrics(NEW_CARD) == ("F1 0.71 on real crops (LEVIR-CD, DSIFN), 0.86 on generated scenes"
                                         " · BLEU-4 0.61 on generated scenes")
    line = card_summary(NEW_CARD)
    assert line.startswith("change mask + captions · 0.5 m/px · 256 px tiles · F1 0.71 on real crops")
    assert line.endswith("research use only: trained on LEVIR-CD imagery")
    lines = metric_lines(NEW_CARD)
    assert lines == ["Metrics on real crops (LEVIR-CD, DSIFN) (LEVIR-CD test, DSIFN test; 128 pairs): F1 0.714",
                     "Metrics on generated scenes (held-out generated pairs; 200 pairs): F1 0.861, BLEU-4 0.61"]


def test_old_cards_without_data_say_generated_scenes_when_the_split_is_synthetic():
    old = {"metrics": {"validation": {"split": "held-out synthetic pairs", "F1": 0.869, "BLEU-4": 0.4805},
                       "test": {"split": "synthetic test pairs, seeds 2000000..", "F1": 0.8563, "BLEU-4": 0.6077}}}
    # one data label: the test block wins, both figures then name it once
    assert summary_metrics(old) == "F1 0.86, BLEU-4 0.61 on generated scenes"
    # the folded card labels each block, test first, so two BLEU-4 values are no longer a riddle
    assert metric_lines(old) == [
        "Metrics on generated scenes (synthetic test pairs, seeds 2000000..): F1 0.856, BLEU-4 0.608",
        "Metrics on generated scenes (held-out synthetic pairs): F1 0.869, BLEU-4 0.48"]
    assert data_label("test", {"split": "LEVIR-CD test"}) == "the test split"
    flat = {"metrics": {"split": "val", "F1": 0.5, "BLEU-4": 0.25}}
    assert metric_lines(flat) == ["Metrics on unstated data (val): F1 0.5, BLEU-4 0.25"]
    assert summary_metrics({"metrics": {}}) == "" and metric_lines({}) == []


def test_cli_models_prints_the_same_summary_line():
    out = subprocess.run([sys.executable, "-m", "changescribe", "models"], capture_output=True, text=True,
                         check=True).stdout
    cards = installed_models()
    assert cards
    for card in cards:
        assert f"    {card_summary(card)}\n" in out
    shipped = json.loads(open(cards[0]["path"]).read()) if cards else {}
    assert "on " in card_summary(shipped) or not shipped.get("metrics")
