"""Training losses, one per paper, kept out of core/ (inference never needs them)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def caption_loss(logits: torch.Tensor, targets: torch.Tensor, pad_id: int = 0) -> torch.Tensor:
    """Word-level cross-entropy over non-padding tokens (Pix4Cap Eq. 8, and every captioner here)."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=pad_id)


def change_loss(logits: torch.Tensor, mask: torch.Tensor, ignore_index: int = 255) -> torch.Tensor:
    """Pixel-wise cross-entropy of the change mask (Pix4Cap Eq. 7); 255 marks unlabelled pixels.

    A batch without any labelled pixel gives 0 (with a graph), not the NaN of an empty mean."""
    target = mask.long()
    if not bool((target != ignore_index).any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits, target, ignore_index=ignore_index)


def dice_loss(logits: torch.Tensor, mask: torch.Tensor, ignore_index: int = 255, eps: float = 1.0) -> torch.Tensor:
    """Soft Dice loss of the change class (1 - 2|P∩G| / (|P| + |G|)) over the labelled pixels of the batch.

    Complements cross-entropy on LEVIR-CD's class imbalance (about 5 % changed pixels); ``eps`` smooths
    batches without change."""
    target = mask.long()
    valid = (target != ignore_index).float()
    prob = logits.float().softmax(1)[:, 1] * valid
    truth = (target == 1).float() * valid
    inter = (prob * truth).sum()
    return 1.0 - (2.0 * inter + eps) / (prob.sum() + truth.sum() + eps)


def cd_loss(logits: torch.Tensor, mask: torch.Tensor, kind: str = "ce") -> tuple[torch.Tensor, dict[str, float]]:
    """The change-detection recipes' loss: ``"ce"`` (BIT) or ``"ce+dice"``; also returns the parts."""
    ce = change_loss(logits, mask)
    if kind == "ce":
        return ce, {"loss_ce": float(ce.detach())}
    if kind == "ce+dice":
        dice = dice_loss(logits, mask)
        return ce + dice, {"loss_ce": float(ce.detach()), "loss_dice": float(dice.detach())}
    raise ValueError(f"unknown loss {kind!r}; use 'ce' or 'ce+dice'")


def pix4cap_loss(cd_logits: torch.Tensor, mask: torch.Tensor, cap_logits: torch.Tensor,
                 targets: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """Eq. 9: L_total = L_det + L_cap; also returns the parts for logging."""
    det = change_loss(cd_logits, mask)
    cap = caption_loss(cap_logits, targets)
    return det + cap, {"loss_det": float(det.detach()), "loss_cap": float(cap.detach())}
