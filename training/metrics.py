"""The papers' metrics: captions with pycocoevalcap (the reference implementation), masks with torchmetrics."""

from __future__ import annotations

import torch
from torchmetrics.classification import (BinaryAccuracy, BinaryF1Score, BinaryJaccardIndex, BinaryPrecision,
                                         BinaryRecall)


def caption_scores(references: list[list[str]], candidates: list[str], meteor: bool = True) -> dict[str, float]:
    """BLEU-1..4, METEOR, ROUGE-L, CIDEr-D and S_m* = mean(BLEU-4, METEOR, ROUGE-L, CIDEr), all in [0, 1]+.

    METEOR runs Java; ``meteor=False`` skips it (quick validation during training) and S_m* then averages
    the three others. SPICE is left out: it downloads models at run time.
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    if len(references) != len(candidates):
        raise ValueError("one list of references per candidate")
    gts = {i: [r if r.strip() else "<empty>" for r in refs] for i, refs in enumerate(references)}
    res = {i: [c if c.strip() else "<empty>"] for i, c in enumerate(candidates)}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    out = {f"BLEU-{n + 1}": float(b) for n, b in enumerate(bleu)}
    out["ROUGE-L"] = float(Rouge().compute_score(gts, res)[0])
    out["CIDEr-D"] = float(Cider().compute_score(gts, res)[0])
    parts = [out["BLEU-4"], out["ROUGE-L"], out["CIDEr-D"]]
    if meteor:
        from pycocoevalcap.meteor.meteor import Meteor

        scorer = Meteor()
        try:
            out["METEOR"] = float(scorer.compute_score(gts, res)[0])
        finally:
            scorer.close() if hasattr(scorer, "close") else None
        parts.append(out["METEOR"])
    out["S_m*"] = sum(parts) / len(parts)
    return out


class MaskScores:
    """Precision / Recall / F1 / IoU / OA of the change class, accumulated over batches."""

    def __init__(self, threshold: float = 0.5):
        self.metrics = {"Precision": BinaryPrecision(threshold=threshold), "Recall": BinaryRecall(threshold=threshold),
                        "F1": BinaryF1Score(threshold=threshold), "IoU": BinaryJaccardIndex(threshold=threshold),
                        "OA": BinaryAccuracy(threshold=threshold)}

    def update(self, probability: torch.Tensor, mask: torch.Tensor) -> None:
        p, m = probability.detach().float().cpu().flatten(), mask.detach().long().cpu().flatten()
        for metric in self.metrics.values():
            metric.update(p, m)

    def compute(self) -> dict[str, float]:
        return {k: float(v.compute()) for k, v in self.metrics.items()}
