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
    """Precision / Recall / F1 / IoU / OA of the change class, accumulated over batches.

    Mask pixels equal to ``ignore_index`` (255: unlabelled) are left out; when no labelled pixel was seen,
    every score is NaN (nothing to measure, e.g. LEVIR-CC without pseudo-labels).
    """

    def __init__(self, threshold: float = 0.5, ignore_index: int = 255):
        # sync_on_compute=False: under DDP only rank 0 validates; a cross-process sync would wait forever
        kw = {"threshold": threshold, "ignore_index": ignore_index, "sync_on_compute": False}
        self.ignore_index = ignore_index
        self.metrics = {"Precision": BinaryPrecision(**kw), "Recall": BinaryRecall(**kw), "F1": BinaryF1Score(**kw),
                        "IoU": BinaryJaccardIndex(**kw), "OA": BinaryAccuracy(**kw)}
        self.labelled = 0

    def update(self, probability: torch.Tensor, mask: torch.Tensor) -> None:
        p, m = probability.detach().float().cpu().flatten(), mask.detach().long().cpu().flatten()
        valid = int((m != self.ignore_index).sum())
        if not valid:
            return
        self.labelled += valid
        for metric in self.metrics.values():
            metric.update(p, m)

    def compute(self) -> dict[str, float]:
        if not self.labelled:
            return {k: float("nan") for k in self.metrics}
        return {k: float(v.compute()) for k, v in self.metrics.items()}
