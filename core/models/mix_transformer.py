"""The Mix Transformer (MiT) encoder of SegFormer (Xie et al., NeurIPS 2021), as published checkpoints lay it out.

Four stages, each an overlapping patch embedding (a strided convolution, then LayerNorm) followed by blocks of

* efficient self-attention: the keys and values come from the tokens after a ``sr`` x ``sr`` strided convolution
  and a LayerNorm (stages with ``sr == 1`` attend to the tokens themselves), so attention stays affordable at
  stride 4;
* Mix-FFN: Linear, a 3x3 depthwise convolution over the token grid (the only position information MiT has),
  GELU, Linear;

both pre-norm with residuals, and a LayerNorm after each stage. The output is the four stage maps at strides 4, 8,
16 and 32. Change-Agent's MCI model (:mod:`.change_agent`) runs on MiT-B1; the sizes of B0..B5 are in
:data:`MIT_VARIANTS`. Layer norms inside blocks and after stages use eps 1e-6, those of the patch embeddings and of
the reduced keys the default 1e-5 (as the published weights were trained).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .attention import MultiHeadAttention

# name -> (widths, heads, depths); every variant reduces keys by 8, 4, 2, 1 and has MLP ratio 4
MIT_VARIANTS: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]] = {
    "mit_b0": ((32, 64, 160, 256), (1, 2, 5, 8), (2, 2, 2, 2)),
    "mit_b1": ((64, 128, 320, 512), (1, 2, 5, 8), (2, 2, 2, 2)),
    "mit_b2": ((64, 128, 320, 512), (1, 2, 5, 8), (3, 4, 6, 3)),
    "mit_b3": ((64, 128, 320, 512), (1, 2, 5, 8), (3, 4, 18, 3)),
    "mit_b4": ((64, 128, 320, 512), (1, 2, 5, 8), (3, 8, 27, 3)),
    "mit_b5": ((64, 128, 320, 512), (1, 2, 5, 8), (3, 6, 40, 3)),
}
MIT_REDUCTIONS = (8, 4, 2, 1)


@dataclass(frozen=True)
class MiTSpec:
    """The sizes of one MiT encoder."""

    widths: tuple[int, ...]
    heads: tuple[int, ...]
    depths: tuple[int, ...]
    reductions: tuple[int, ...] = MIT_REDUCTIONS
    mlp_ratio: int = 4
    in_channels: int = 3


def to_tokens(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H*W, C), row-major."""
    return x.flatten(2).transpose(1, 2)


def to_grid(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(B, H*W, C) -> (B, C, H, W)."""
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], h, w)


class PatchEmbed(nn.Module):
    """Overlapping patches: a ``kernel``-square convolution at ``stride`` (padding kernel // 2), then LayerNorm."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(cin, cout, kernel, stride, kernel // 2)
        self.norm = nn.LayerNorm(cout)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        x = self.proj(x)
        h, w = x.shape[-2:]
        return self.norm(to_tokens(x)), h, w


class ReducedAttention(nn.Module):
    """Self-attention whose keys and values are computed on the grid shrunk by a strided ``reduction`` convolution
    (and LayerNorm); no shrinking when ``reduction == 1``."""

    def __init__(self, dim: int, heads: int, reduction: int) -> None:
        super().__init__()
        self.attn = MultiHeadAttention(dim, heads)
        self.reduction = reduction
        if reduction > 1:
            self.reduce = nn.Conv2d(dim, dim, reduction, reduction)
            self.reduce_norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        context = x
        if self.reduction > 1:
            context = self.reduce_norm(to_tokens(self.reduce(to_grid(x, h, w))))
        return self.attn(x, context)


class MixFFN(nn.Module):
    """Linear, 3x3 depthwise convolution on the token grid, GELU, Linear."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = nn.Conv2d(hidden, hidden, 3, 1, 1, groups=hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        return self.fc2(F.gelu(to_tokens(self.dwconv(to_grid(self.fc1(x), h, w)))))


class MiTBlock(nn.Module):
    def __init__(self, dim: int, heads: int, reduction: int, mlp_ratio: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = ReducedAttention(dim, heads, reduction)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = MixFFN(dim, dim * mlp_ratio)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), h, w)
        return x + self.mlp(self.norm2(x), h, w)


class MixTransformer(nn.Module):
    """MiT encoder: ``forward(x)`` -> the four stage maps (strides 4, 8, 16, 32), ``stage(i, x)`` runs one."""

    def __init__(self, spec: MiTSpec) -> None:
        super().__init__()
        self.spec = spec
        cins = (spec.in_channels, *spec.widths[:-1])
        self.embeds = nn.ModuleList([PatchEmbed(cin, cout, 7 if i == 0 else 3, 4 if i == 0 else 2)
                                     for i, (cin, cout) in enumerate(zip(cins, spec.widths))])
        self.stages = nn.ModuleList([
            nn.ModuleList([MiTBlock(dim, heads, red, spec.mlp_ratio) for _ in range(depth)])
            for dim, heads, red, depth in zip(spec.widths, spec.heads, spec.reductions, spec.depths)])
        self.norms = nn.ModuleList([nn.LayerNorm(dim, eps=1e-6) for dim in spec.widths])

    @property
    def out_channels(self) -> tuple[int, ...]:
        return self.spec.widths

    def stage(self, i: int, x: torch.Tensor) -> torch.Tensor:
        t, h, w = self.embeds[i](x)
        for block in self.stages[i]:
            t = block(t, h, w)
        return to_grid(self.norms[i](t), h, w)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        maps = []
        for i in range(len(self.stages)):
            x = self.stage(i, x)
            maps.append(x)
        return maps
