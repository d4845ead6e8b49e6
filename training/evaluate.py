"""``python -m changescribe.training eval MODEL_CARD``: the papers' metric table for a model file.

Captions: BLEU-1..4, METEOR, ROUGE-L, CIDEr-D, S_m* (pycocoevalcap); masks: Precision, Recall, F1, IoU, OA
(torchmetrics). Data: held-out synthetic pairs (seeds disjoint from training and validation) by default, or
a split of a real dataset (``--config`` naming ``data.source``/``data.root``, ``--split test``). Caption
metrics need a captioner and captions; mask metrics need labelled masks (255 = unlabelled is left out).
"""

from __future__ import annotations

import json
import math

from torch.utils.data import DataLoader

from changescribe.core.model_api import ChangeModel
from changescribe.core.model_loading import load_model

from .config import DataConfig
from .datasets.common import collate
from .datasets.synthetic import SyntheticChangeDataset
from .metrics import MaskScores, caption_scores

TEST_FIRST_SEED = 2_000_000  # training uses 0.., validation 1,000,000..


def evaluate(model: ChangeModel, data, batch_size: int, meteor: bool = False, beam_size: int = 1,
             num_workers: int = 0) -> dict[str, float]:
    """Mask metrics over all labelled pixels and, for captioners, caption metrics against all references."""
    scores = MaskScores()
    refs: list[list[str]] = []
    hyps: list[str] = []
    captions = bool(getattr(model, "can_caption", False))
    detects = bool(getattr(model, "can_detect", True))  # SEN before its pairing: captions only
    loader = DataLoader(data, batch_size=batch_size, collate_fn=collate, num_workers=num_workers)
    referenced = True  # a pair without references voids the caption metrics: stop generating captions
    for batch in loader:
        before, after = batch["before"].float().to(model.device), batch["after"].float().to(model.device)
        referenced = referenced and all(batch["captions"])
        if detects:
            pred = model.predict(before, after, with_captions=captions and referenced, beam_size=beam_size)
            scores.update(pred.probability, batch["mask"])
            hyp = pred.captions
        else:
            hyp = model.caption(before, after, beam_size=beam_size) if captions and referenced else None
        if captions and hyp is not None:
            refs += batch["captions"]
            hyps += hyp
    out = {k: v for k, v in scores.compute().items() if not math.isnan(v)}
    if hyps and referenced:
        out.update(caption_scores(refs, hyps, meteor=meteor))
    return out


def evaluate_model_file(card: str, pairs: int = 200, size: int | None = None, beam_size: int = 3,
                        device: str = "cpu", batch_size: int = 16, data: DataConfig | None = None,
                        split: str | None = "test") -> dict:
    """The metric table of a model file on synthetic test pairs, or on ``split`` of ``data``."""
    model = load_model(card, device)
    if data is not None and data.source != "synthetic":
        from .datasets import build_dataset

        ds = build_dataset(data, split)
        desc = f"{data.source} {split or 'all'} ({len(ds)} pairs, {data.root})"
    else:
        size = size or model.input_spec.tile_size
        ds = SyntheticChangeDataset(pairs, size, TEST_FIRST_SEED, p_no_change=0.3)
        desc = f"synthetic test pairs, seeds {TEST_FIRST_SEED}..{TEST_FIRST_SEED + pairs - 1}, {size}² px"
    scores = evaluate(model, ds, batch_size, meteor=True, beam_size=beam_size)
    return {"split": desc, "beam_size": beam_size, **{k: round(v, 4) for k, v in scores.items()}}


def print_table(scores: dict) -> None:
    cap = ["BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr-D", "S_m*"]
    cd = ["Precision", "Recall", "F1", "IoU", "OA"]
    for keys in (cap, cd):
        if not all(k in scores for k in keys):
            continue
        print("| " + " | ".join(keys) + " |")
        print("|" + "---|" * len(keys))
        print("| " + " | ".join(f"{100 * scores[k]:.2f}" for k in keys) + " |")
    print(json.dumps(scores))
