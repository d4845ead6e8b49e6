"""``python -m changescribe.training eval MODEL_CARD``: the papers' metric table for a model file.

Captions: BLEU-1..4, METEOR, ROUGE-L, CIDEr-D, S_m* (pycocoevalcap); masks: Precision, Recall, F1, IoU, OA
(torchmetrics). Data: held-out synthetic pairs (seeds disjoint from training and validation).
"""

from __future__ import annotations

import json

from changescribe.core.model_loading import load_model

from .datasets.synthetic import SyntheticChangeDataset
from .recipes.pix4cap import evaluate

TEST_FIRST_SEED = 2_000_000  # training uses 0.., validation 1,000,000..


def evaluate_model_file(card: str, pairs: int = 200, size: int | None = None, beam_size: int = 3,
                        device: str = "cpu", batch_size: int = 16) -> dict:
    model = load_model(card, device)
    size = size or model.input_spec.tile_size
    data = SyntheticChangeDataset(pairs, size, TEST_FIRST_SEED, p_no_change=0.3)
    scores = evaluate(model, data, batch_size, meteor=True, beam_size=beam_size)
    return {"split": f"synthetic test pairs, seeds {TEST_FIRST_SEED}..{TEST_FIRST_SEED + pairs - 1}, {size}² px",
            "beam_size": beam_size, **{k: round(v, 4) for k, v in scores.items()}}


def print_table(scores: dict) -> None:
    cap = ["BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr-D", "S_m*"]
    cd = ["Precision", "Recall", "F1", "IoU", "OA"]
    for keys in (cap, cd):
        print("| " + " | ".join(keys) + " |")
        print("|" + "---|" * len(keys))
        print("| " + " | ".join(f"{100 * scores[k]:.2f}" for k in keys) + " |")
    print(json.dumps(scores))
