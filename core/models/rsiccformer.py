"""RSICCformer (Liu et al., TGRS 2022): the LEVIR-CC change captioner of Chen-Yang-Liu/RSICC, layer for layer.

Its published checkpoints import into this architecture (``changescribe models import --from rsiccformer``), so it
computes what the original computes:

* a ResNet-101 cut after layer3 (stride 16, 1024 channels) encodes each image; its map is average-pooled to a fixed
  ``grid`` x ``grid`` (14 x 14) whatever the tile size;
* a 1x1 projection to ``d_model`` (512) plus a 2-D position code that *concatenates* a column embedding and a row
  embedding (``d_model / 2`` each);
* ``layers`` (3) dual-branch cross layers: each image's tokens attend to the difference (after - before) with one
  shared post-norm attention + FFN block;
* the fusion: per layer, the running sum plus that layer's [before, after] tokens (2 * d_model) goes through a
  bottleneck residual block (1x1 half, 3x3, 1x1, BatchNorm) and a LayerNorm;
* the shared :class:`.caption_decoder.CaptionDecoder` as RSICC's decoder: 2 * d_model wide, post-norm, no outer
  residual, sinusoidal positions, 52 positions (its greedy search stops after 51 words).

Caption only: it has no change head and runs paired with a change detector (``pair_with`` in its card).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .attention import CrossAttentionBlock
from .backbones import ResNetBackbone
from .caption_decoder import CaptionDecoder
from .network import ChangeNetwork


@dataclass(frozen=True)
class RSICCformerConfig:
    backbone: str = "resnet101"
    backbone_stages: int = 3  # RSICC's CNN_Encoder keeps conv1 .. layer3
    in_channels: int = 3
    grid: int = 14  # the encoder's adaptive pool (fixed in RSICC's fusion)
    d_model: int = 512
    heads: int = 8
    layers: int = 3  # dual-branch cross layers
    decoder_heads: int = 8
    decoder_layers: int = 1
    dropout: float = 0.5  # RSICC trains with 0.5; inactive at inference
    vocab_size: int = 500
    max_caption_length: int = 52  # RSICC's decoding buffer: <start> + at most 51 words


@dataclass
class RSICCformerFeatures:
    """What :meth:`RSICCformer.encode` returns: the fused tokens (B, grid*grid, 2 * d_model)."""

    tokens: torch.Tensor


class BottleneckFusion(nn.Module):
    """``relu(x + BN(1x1(relu(BN(3x3(relu(BN(1x1 to half(x)))))))))``: RSICC's fusion residual block."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        half = channels // 2
        self.body = nn.Sequential(
            nn.Conv2d(channels, half, 1), nn.BatchNorm2d(half), nn.ReLU(inplace=True),
            nn.Conv2d(half, half, 3, padding=1), nn.BatchNorm2d(half), nn.ReLU(inplace=True),
            nn.Conv2d(half, channels, 1), nn.BatchNorm2d(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.body(x) + x)


class RSICCformer(ChangeNetwork):
    """RSICCformer on normalised inputs; ``forward(before, after, tokens)`` -> caption logits (B, T, V)."""

    can_caption = True
    can_detect = False

    def __init__(self, cfg: RSICCformerConfig | None = None) -> None:
        super().__init__()
        cfg = cfg or RSICCformerConfig()
        if cfg.d_model % 2:
            raise ValueError("d_model must be even (its position code is two halves)")
        self.cfg = cfg
        self.extractor = ResNetBackbone(cfg.backbone, cfg.in_channels, cfg.backbone_stages, 32)
        d = cfg.d_model
        self.proj = nn.Conv2d(self.extractor.out_channels, d, 1)
        self.col_embed = nn.Embedding(cfg.grid, d // 2)
        self.row_embed = nn.Embedding(cfg.grid, d // 2)
        self.cross = nn.ModuleList([CrossAttentionBlock(d, cfg.heads, 4 * d, cfg.dropout) for _ in range(cfg.layers)])
        self.fuse = nn.ModuleList([BottleneckFusion(2 * d) for _ in range(cfg.layers)])
        self.fuse_norm = nn.ModuleList([nn.LayerNorm(2 * d) for _ in range(cfg.layers)])
        self.decoder = CaptionDecoder(cfg.vocab_size, 2 * d, cfg.decoder_heads, cfg.decoder_layers, 8 * d,
                                      cfg.dropout, cfg.max_caption_length, layer_residual=False)

    def load_backbone(self, path: str | Path) -> None:
        """torchvision-layout ResNet weights (ImageNet) for the extractor."""
        self.extractor.load_pretrained(path)

    def _image_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """One image -> (B, grid*grid, d_model) projected tokens with the position code."""
        g = self.cfg.grid
        feats = self.proj(F.adaptive_avg_pool2d(self.extractor(x)[-1], (g, g)))
        idx = torch.arange(g, device=feats.device)
        cols = self.col_embed(idx)[None, :, :].expand(g, g, -1)  # [row, col] -> column code
        rows = self.row_embed(idx)[:, None, :].expand(g, g, -1)  # [row, col] -> row code
        pos = torch.cat([cols, rows], -1).reshape(g * g, -1)
        return feats.flatten(2).transpose(1, 2) + pos

    def encode(self, before: torch.Tensor, after: torch.Tensor) -> RSICCformerFeatures:
        b = before.shape[0]
        both = self._image_tokens(torch.cat([before, after], 0))  # one backbone pass for both dates
        x1, x2 = both[:b], both[b:]
        g, d2 = self.cfg.grid, 2 * self.cfg.d_model
        fused = both.new_zeros(b, g * g, d2)
        for block, fuse, norm in zip(self.cross, self.fuse, self.fuse_norm):
            diff = x2 - x1
            x1, x2 = block(x1, diff), block(x2, diff)
            grid = (fused + torch.cat([x1, x2], -1)).transpose(1, 2).reshape(b, d2, g, g)
            fused = norm(fuse(grid).flatten(2).transpose(1, 2))
        return RSICCformerFeatures(fused)

    def caption_memory(self, feats: RSICCformerFeatures) -> tuple[torch.Tensor, torch.Tensor | None]:
        return feats.tokens, None

    def forward(self, before: torch.Tensor, after: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """``tokens`` (B, T) decoder inputs starting with <START> -> logits (B, T, V)."""
        return self.decoder(tokens, self.encode(before, after).tokens)
