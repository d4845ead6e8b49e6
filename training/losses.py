"""Training losses, one per paper, kept out of core/ (inference never needs them)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def caption_loss(logits: torch.Tensor, targets: torch.Tensor, pad_id: int = 0) -> torch.Tensor:
    """Word-level cross-entropy over non-padding tokens (Pix4Cap Eq. 8, and every captioner here)."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=pad_id)


def change_loss(logits: torch.Tensor, mask: torch.Tensor, ignore_index: int = 255) -> torch.Tensor:
    """Pixel-wise cross-entropy of the change mask (Pix4Cap Eq. 7); 255 marks unlabelled pixels."""
    return F.cross_entropy(logits, mask.long(), ignore_index=ignore_index)


def pix4cap_loss(cd_logits: torch.Tensor, mask: torch.Tensor, cap_logits: torch.Tensor,
                 targets: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """Eq. 9: L_total = L_det + L_cap; also returns the parts for logging."""
    det = change_loss(cd_logits, mask)
    cap = caption_loss(cap_logits, targets)
    return det + cap, {"loss_det": float(det.detach()), "loss_cap": float(cap.detach())}
