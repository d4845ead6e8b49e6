"""Training losses, one per paper, kept out of core/ (inference never needs them)."""

from __future__ import annotations

from collections.abc import Sequence

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
                 targets: torch.Tensor, kind: str = "ce") -> tuple[torch.Tensor, dict[str, float]]:
    """Eq. 9: L_total = L_det + L_cap, L_det as :func:`cd_loss` ``kind`` (the paper: "ce"); also returns the parts."""
    det, _ = cd_loss(cd_logits, mask, kind)
    cap = caption_loss(cap_logits, targets)
    return det + cap, {"loss_det": float(det.detach()), "loss_cap": float(cap.detach())}


# ---- DFM: Text-guided Gated Contrastive Loss (seed paper 002, Sec. III-C, Eq. 1-5) ------------------------------
def change_gate(captions: Sequence[str]) -> torch.Tensor:
    """TGCL's gating indicator g_i: 0 for a "no change" caption, 1 for a caption that describes a change.

    LEVIR-CC words every no-change pair (``changeflag`` 0) with the same five sentences, which the synthetic
    generator and the annotation export reuse (``core.annotations.NO_CHANGE_CAPTIONS``); they are matched after
    LEVIR-CC tokenisation, so case and final periods do not matter. An empty caption counts as no change."""
    from changescribe.core.annotations import NO_CHANGE_CAPTIONS
    from changescribe.core.vocabulary import tokenize

    sentences = {" ".join(tokenize(s)) for s in NO_CHANGE_CAPTIONS}
    return torch.tensor([float(bool(c.strip()) and " ".join(tokenize(c)) not in sentences) for c in captions])


def gated_contrastive_loss(logits: torch.Tensor, gate: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """TGCL: symmetric InfoNCE between pair i's change embedding and caption i, over gated anchors only.

    ``logits`` (B, B) is ``exp(t) * cos(v_i, t_j)`` (image rows, caption columns; DFM.contrastive_logits).
    L_i2t = sum_i g_i CE(logits[i, :], i) / (sum g + eps), L_t2i the same on the columns, TGCL their mean.
    A no-change pair is never an anchor (its near-zero difference embedding would be pulled towards a
    "nothing changed" sentence), but stays in the softmax as a negative. A batch without any change gives 0
    with a graph."""
    if logits.ndim != 2 or logits.shape[0] != logits.shape[1]:
        raise ValueError(f"TGCL needs a square (pairs x captions) similarity matrix, got {tuple(logits.shape)}")
    gate = gate.to(device=logits.device, dtype=logits.dtype)
    target = torch.arange(logits.shape[0], device=logits.device)
    i2t = F.cross_entropy(logits, target, reduction="none")
    t2i = F.cross_entropy(logits.t(), target, reduction="none")
    valid = gate.sum() + eps
    return 0.5 * ((gate * i2t).sum() / valid + (gate * t2i).sum() / valid)


def global_gated_contrastive_loss(v: torch.Tensor, t: torch.Tensor, scale: torch.Tensor, gate: torch.Tensor,
                                  eps: float = 1e-8) -> torch.Tensor:
    """TGCL over the whole batch of all processes: unit embeddings ``v`` (pairs) and ``t`` (captions), ``scale``
    = exp(t). Alone it is :func:`gated_contrastive_loss` of ``scale * v @ t.T``.

    Under DDP every process's pairs and captions are gathered (with gradient), so each anchor meets the global
    batch's negatives, as CLIP-style losses do; each process scores its own anchors against them, over the
    global count of gated anchors. DDP averages gradients over the W processes, so the local value is scaled by
    W: the averaged gradient is then exactly that of TGCL on the concatenated batch."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return gated_contrastive_loss(scale * v @ t.t(), gate, eps)
    from torch.distributed.nn.functional import all_gather

    world, rank = dist.get_world_size(), dist.get_rank()
    gate = gate.to(device=v.device, dtype=v.dtype)
    v_all, t_all = torch.cat(all_gather(v)), torch.cat(all_gather(t))
    gates = [torch.empty_like(gate) for _ in range(world)]
    dist.all_gather(gates, gate)
    target = torch.arange(v.shape[0], device=v.device) + rank * v.shape[0]  # equal batches (DistributedSampler)
    i2t = F.cross_entropy(scale * v @ t_all.t(), target, reduction="none")
    t2i = F.cross_entropy(scale * t @ v_all.t(), target, reduction="none")
    valid = torch.cat(gates).sum() + eps
    return world * 0.5 * ((gate * i2t).sum() + (gate * t2i).sum()) / valid


def dfm_loss(cap_logits: torch.Tensor, targets: torch.Tensor, v: torch.Tensor, t: torch.Tensor,
             scale: torch.Tensor, gate: torch.Tensor, weights: dict[str, float]) -> tuple[torch.Tensor, dict[str, float]]:
    """DFM Eq. 6: ``weights["caption"] * L_cap + weights["tgcl"] * L_TGCL`` (TGCL over all processes' pairs);
    also returns the parts."""
    cap = caption_loss(cap_logits, targets)
    tgcl = global_gated_contrastive_loss(v, t, scale, gate)
    total = weights["caption"] * cap + weights["tgcl"] * tgcl
    return total, {"loss_cap": float(cap.detach()), "loss_tgcl": float(tgcl.detach())}


# ---- Semantic-CC (seed paper 001, Sec. III-F, Eq. 9) -------------------------------------------------------------
def semantic_cc_loss(cd_logits: torch.Tensor, mask: torch.Tensor, cap_logits: torch.Tensor, targets: torch.Tensor,
                     cd_weight: float, ignore_index: int = -100) -> tuple[torch.Tensor, dict[str, float]]:
    """Eq. 9: L = L_cc + lambda * L_cd (the paper's lambda = 0.5). L_cd is the pixel cross-entropy of the change
    mask (two-class softmax, the paper's binary CE), L_cc the token cross-entropy; caption targets equal to
    ``ignore_index`` (padding) are left out. Also returns the parts."""
    cd = change_loss(cd_logits, mask)
    cc = caption_loss(cap_logits, targets, pad_id=ignore_index)
    return cc + cd_weight * cd, {"loss_cd": float(cd.detach()), "loss_cc": float(cc.detach())}
