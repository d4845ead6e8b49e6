"""MoCo-v2 (He et al., CVPR 2020; Chen et al., arXiv:2003.04297) for SEN's bi-temporal contrastive pre-training.

SEN (seed paper 003, Sec. III-B, Eq. 1) pre-trains its single-stream extractor f_q on 6-band stacks of two dates
of one place with MoCo-v2, as SSL4EO-S12 does for single dates. The pieces:

* **query / key encoders**: the SEN extractor (:class:`~changescribe.core.models.backbones.ResNetBackbone` with a
  6-band stem), global average pooling and MoCo-v2's MLP head (C -> C -> ReLU -> ``dim``). The key encoder is a
  copy that never gets gradients: before each forward it moves ``theta_k <- m theta_k + (1 - m) theta_q``.
* **queue**: the last ``queue_size`` keys (L2-normalised, ``(dim, K)``), a ring buffer written at ``queue_ptr``.
  Under DDP the keys of all processes are gathered first, so every process holds the same queue.
* **InfoNCE** (Eq. 1): logits ``[q.k+, q.queue] / tau``, cross-entropy with the positive in column 0.
* **shuffle BN**: MoCo shuffles the key batch across GPUs so that batch-norm statistics cannot tell a query
  which key is its own. Here each process batch-normalises in ``bn_groups`` groups: the queries in their order,
  the keys after a random permutation (one device behaves like ``bn_groups`` GPUs).

The momentum update and the enqueue run inside ``forward`` (training mode only), as in MoCo, so the shared
engine's loop drives it unchanged; with ``optim.accumulate`` > 1 the key encoder moves once per batch, not per
optimiser step. Only the query extractor is kept (:func:`backbone_state_dict`, torchvision key layout), which
:class:`ResNetBackbone` loads as SEN's backbone (``SEN.load_backbone``).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from changescribe.core.models.backbones import ResNetBackbone


class ProjectedEncoder(nn.Module):
    """Backbone -> global average pool -> MoCo-v2 MLP head (C, C, ReLU, dim)."""

    def __init__(self, backbone: ResNetBackbone, dim: int) -> None:
        super().__init__()
        c = backbone.out_channels
        self.backbone = backbone
        self.head = nn.Sequential(nn.Linear(c, c), nn.ReLU(inplace=True), nn.Linear(c, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x)[-1].mean(dim=(2, 3)))


def moco_logits(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float) -> torch.Tensor:
    """Eq. 1's logits for L2-normalised ``q``, ``k`` (B, dim) and ``queue`` (dim, K): column 0 is the positive
    ``q.k+ / tau``, columns 1..K the negatives ``q.queue / tau``."""
    pos = (q * k).sum(dim=1, keepdim=True)
    return torch.cat([pos, q @ queue], dim=1) / temperature


def info_nce(logits: torch.Tensor) -> torch.Tensor:
    """Eq. 1: ``-log(exp(l_0) / sum_j exp(l_j))`` averaged over the batch (the positive is column 0)."""
    return F.cross_entropy(logits, torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device))


def _gather(x: torch.Tensor) -> torch.Tensor:
    """All processes' rows (no gradient), or ``x`` itself without DDP."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return x
    parts = [torch.empty_like(x) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(parts, x.contiguous())
    return torch.cat(parts)


class MoCo(nn.Module):
    """MoCo-v2 on bi-temporal stacks: ``forward(query, key) -> logits (B, 1 + K)``, positive in column 0.

    ``query``/``key`` are the two augmented views (normalised 6-band stacks) of the same places. The defaults are
    MoCo-v2's (dim 128, K 65536, m 0.999) and SSL4EO-S12's tau 0.2 (MoCo-v2's ImageNet runs also use 0.2)."""

    def __init__(self, backbone: ResNetBackbone, dim: int = 128, queue_size: int = 65536, momentum: float = 0.999,
                 temperature: float = 0.2, bn_groups: int = 1) -> None:
        super().__init__()
        if not 0.0 <= momentum < 1.0 or temperature <= 0 or queue_size < 1 or bn_groups < 1:
            raise ValueError("MoCo needs 0 <= momentum < 1, temperature > 0, queue_size >= 1, bn_groups >= 1")
        self.momentum, self.temperature, self.bn_groups = momentum, temperature, bn_groups
        self.encoder_q = ProjectedEncoder(backbone, dim)
        self.encoder_k = copy.deepcopy(self.encoder_q)
        for p in self.encoder_k.parameters():
            p.requires_grad_(False)
        self.register_buffer("queue", F.normalize(torch.randn(dim, queue_size), dim=0))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))

    @property
    def queue_size(self) -> int:
        return self.queue.shape[1]

    @torch.no_grad()
    def momentum_update(self) -> None:
        """``theta_k <- m theta_k + (1 - m) theta_q`` for every parameter (buffers such as BN statistics keep
        their own running values, as in MoCo)."""
        for pk, pq in zip(self.encoder_k.parameters(), self.encoder_q.parameters()):
            pk.mul_(self.momentum).add_(pq.detach(), alpha=1.0 - self.momentum)

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """Write ``keys`` (n, dim) into the ring buffer at ``queue_ptr`` (wrapping around), oldest out first."""
        keys = _gather(keys)
        n, size = keys.shape[0], self.queue_size
        if n > size:
            raise ValueError(f"{n} keys per step do not fit a queue of {size}")
        ptr = int(self.queue_ptr)
        idx = (torch.arange(n, device=keys.device) + ptr) % size
        self.queue[:, idx] = keys.t().to(self.queue.dtype)
        self.queue_ptr[0] = (ptr + n) % size

    def _grouped(self, encoder: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The encoder over ``bn_groups`` slices of the batch (batch norm sees one slice at a time)."""
        groups = min(self.bn_groups, x.shape[0])
        return torch.cat([encoder(part) for part in x.tensor_split(groups)]) if groups > 1 else encoder(x)

    def forward(self, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        q = F.normalize(self._grouped(self.encoder_q, query).float(), dim=1)
        with torch.no_grad():
            if self.training:
                self.momentum_update()
            perm = torch.randperm(key.shape[0], device=key.device)  # shuffle BN: other groups than the queries'
            k = self._grouped(self.encoder_k, key[perm])[torch.argsort(perm)]
            k = F.normalize(k.float(), dim=1)
            negatives = self.queue.clone()  # the queue before this batch's keys join it
        with torch.autocast(q.device.type, enabled=False):  # 1 + K logits in full precision under AMP
            logits = moco_logits(q, k, negatives, self.temperature)
        if self.training:
            self.enqueue(k)
        return logits


def backbone_state_dict(backbone: ResNetBackbone) -> dict[str, torch.Tensor]:
    """The extractor's weights in torchvision's ResNet key layout (``conv1``, ``bn1``, ``layer1..4``), the
    layout :meth:`ResNetBackbone.load_pretrained` reads, so ``SEN.load_backbone`` takes the file as it is."""
    out = {}
    for k, v in backbone.state_dict().items():
        if k.startswith("layers."):
            i, rest = k[len("layers."):].split(".", 1)
            k = f"layer{int(i) + 1}.{rest}"
        out[k] = v.detach().to("cpu").contiguous()
    return out
