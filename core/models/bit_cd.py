"""BIT: bitemporal image transformer for change detection (Chen, Qi & Shi, IEEE TGRS 2021).

Paper defaults (BIT's "ResNet18_S4" model): siamese ResNet-18 up to layer3 with the layer3 stride
replaced by dilation (output stride 8), 2x upsampling and a 3x3 conv to C=32 channels; a semantic
tokenizer (1x1 conv -> spatial softmax -> L=4 tokens per image); a transformer encoder (1 layer) over the
2L tokens of both dates with learned positions; a transformer decoder (8 layers) in which each image's
pixels query its own refined tokens; |difference|, upsampling to input size and a two-conv head to
2 classes. Attention: 8 heads x 64 dims, MLP width 2C, pre-norm, no dropout. One deliberate difference
from the BIT code: attention is scaled by 1/sqrt(dim_head) (standard) instead of 1/sqrt(C).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .attention import PreNormBlock
from .backbones import ResNetBackbone


@dataclass
class BitCDConfig:
    backbone: str = "resnet18"
    in_channels: int = 3
    backbone_stages: int = 3  # layer1..layer3 ("S4" = four ResNet stages counting the stem)
    output_stride: int = 8
    feature_dim: int = 32
    token_len: int = 4
    enc_depth: int = 1
    dec_depth: int = 8
    heads: int = 8
    dim_head: int = 64
    mlp_ratio: int = 2
    num_classes: int = 2


@dataclass
class BitCDFeatures:
    """What :meth:`BitCD.encode` returns: refined pixel features of both dates."""

    x1: torch.Tensor
    x2: torch.Tensor
    size: tuple[int, int]


class BitCD(nn.Module):
    """BIT change detector; ``forward(before, after)`` -> logits (B, num_classes, H, W) on normalised input."""

    can_caption = False

    def __init__(self, cfg: BitCDConfig | None = None, backbone_weights: str | None = None) -> None:
        super().__init__()
        cfg = cfg or BitCDConfig()
        self.cfg = cfg
        self.backbone = ResNetBackbone(cfg.backbone, cfg.in_channels, cfg.backbone_stages, cfg.output_stride,
                                       backbone_weights)
        c = cfg.feature_dim
        self.reduce = nn.Conv2d(self.backbone.out_channels, c, 3, padding=1)
        self.tokenizer = nn.Conv2d(c, cfg.token_len, 1, bias=False)
        self.pos = nn.Parameter(torch.randn(1, 2 * cfg.token_len, c) * 0.02)
        mlp = c * cfg.mlp_ratio
        self.encoder = nn.ModuleList(
            [PreNormBlock(c, cfg.heads, cfg.dim_head, mlp, cross=False) for _ in range(cfg.enc_depth)])
        self.decoder = nn.ModuleList(
            [PreNormBlock(c, cfg.heads, cfg.dim_head, mlp, cross=True) for _ in range(cfg.dec_depth)])
        self.head = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True),
                                  nn.Conv2d(c, cfg.num_classes, 3, padding=1))

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        f = self.backbone(x)[-1]
        scale = self.backbone.strides[-1] // 4  # BIT decodes at stride 4
        if scale > 1:
            f = F.interpolate(f, scale_factor=scale, mode="nearest")
        return self.reduce(f)

    def _tokens(self, x: torch.Tensor) -> torch.Tensor:
        attn = self.tokenizer(x).flatten(2).softmax(-1)  # (B, L, HW) spatial attention per token
        return torch.einsum("bln,bcn->blc", attn, x.flatten(2))

    def encode(self, before: torch.Tensor, after: torch.Tensor) -> BitCDFeatures:
        b = before.shape[0]
        feats = self._features(torch.cat([before, after], 0))  # shared (siamese) weights, one pass
        tokens = self._tokens(feats)
        tokens = torch.cat([tokens[:b], tokens[b:]], 1) + self.pos  # (B, 2L, C)
        for blk in self.encoder:
            tokens = blk(tokens)
        t1, t2 = tokens.chunk(2, dim=1)
        ctx = torch.cat([t1, t2], 0)
        _, c, h, w = feats.shape
        x = feats.flatten(2).transpose(1, 2)
        for blk in self.decoder:
            x = blk(x, ctx)
        x = x.transpose(1, 2).reshape(2 * b, c, h, w)
        return BitCDFeatures(x[:b], x[b:], (before.shape[-2], before.shape[-1]))

    def change_logits(self, feats: BitCDFeatures) -> torch.Tensor:
        d = (feats.x1 - feats.x2).abs()
        d = F.interpolate(d, size=feats.size, mode="bilinear", align_corners=False)
        return self.head(d)

    def forward(self, before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
        return self.change_logits(self.encode(before, after))
