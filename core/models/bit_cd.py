"""BIT: bitemporal image transformer for change detection (Chen, Qi & Shi, IEEE TGRS 2021).

Paper defaults (BIT's "ResNet18_S4" model): siamese ResNet-18 up to layer3 with the layer3 stride
replaced by dilation (output stride 8), 2x upsampling and a 3x3 conv to C=32 channels; a semantic
tokenizer (1x1 conv -> spatial softmax -> L=4 tokens per image); a transformer encoder (1 layer) over the
2L tokens of both dates with learned positions; a transformer decoder (8 layers) in which each image's
pixels query its own refined tokens; |difference|, upsampling to input size and a two-conv head to
2 classes. Attention: 8 heads x 64 dims, MLP width 2C, pre-norm, no dropout. One deliberate difference
from the BIT code: attention is scaled by 1/sqrt(dim_head) (standard) instead of 1/sqrt(C).

The BIT code itself (justchenhao/BIT_CD) differs in four more ways, each a config option so that its published
weights run op for op (``core/models/converters.py`` imports them with :data:`BIT_ORIGINAL`): attention scaled by
1/sqrt(C) (``attention_scale="dim"``), no bias on q/k/v (``qkv_bias=False``), a decoder head width of its own
(``dec_dim_head``, 8 in the released LEVIR-CD model) and a layer3 whose stride is removed but whose convolutions
are not dilated (its BasicBlock ignores the dilation: ``backbone_dilation=False``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .attention import PreNormBlock
from .backbones import ResNetBackbone
from .network import ChangeNetwork


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
    attention_scale: str = "dim_head"  # softmax scale 1/sqrt(dim_head); "dim": 1/sqrt(feature_dim), as BIT's code
    qkv_bias: bool = True  # BIT's code has none
    dec_dim_head: int | None = None  # decoder head width; None: dim_head
    backbone_dilation: bool = True  # False: stride removed without dilation, as BIT's code (output_stride < 32)


# The BIT code's own layer options (its released LEVIR-CD model also has dec_dim_head=8, read from its weights).
BIT_ORIGINAL = {"attention_scale": "dim", "qkv_bias": False, "backbone_dilation": False}
ATTENTION_SCALES = ("dim_head", "dim")


def _undilate(backbone: ResNetBackbone) -> None:
    """Undo the dilation of the stages whose stride was removed (BIT's BasicBlock ignores dilation)."""
    for m in backbone.layers.modules():
        if isinstance(m, nn.Conv2d) and m.dilation != (1, 1):
            m.dilation = (1, 1)
            m.padding = (m.kernel_size[0] // 2, m.kernel_size[1] // 2)


@dataclass
class BitCDFeatures:
    """What :meth:`BitCD.encode` returns: refined pixel features of both dates."""

    x1: torch.Tensor
    x2: torch.Tensor
    size: tuple[int, int]


class BitCD(ChangeNetwork):
    """BIT change detector; ``forward(before, after)`` -> logits (B, num_classes, H, W) on normalised input."""

    def __init__(self, cfg: BitCDConfig | None = None) -> None:
        super().__init__()
        cfg = cfg or BitCDConfig()
        self.cfg = cfg
        self.backbone = ResNetBackbone(cfg.backbone, cfg.in_channels, cfg.backbone_stages, cfg.output_stride)
        if not cfg.backbone_dilation:
            _undilate(self.backbone)
        if cfg.attention_scale not in ATTENTION_SCALES:
            raise ValueError(f"attention_scale must be one of {ATTENTION_SCALES}, not {cfg.attention_scale!r}")
        c = cfg.feature_dim
        scale = c ** -0.5 if cfg.attention_scale == "dim" else None
        self.reduce = nn.Conv2d(self.backbone.out_channels, c, 3, padding=1)
        self.tokenizer = nn.Conv2d(c, cfg.token_len, 1, bias=False)
        self.pos = nn.Parameter(torch.randn(1, 2 * cfg.token_len, c) * 0.02)
        mlp = c * cfg.mlp_ratio
        self.encoder = nn.ModuleList(
            [PreNormBlock(c, cfg.heads, cfg.dim_head, mlp, cross=False, qkv_bias=cfg.qkv_bias, scale=scale)
             for _ in range(cfg.enc_depth)])
        self.decoder = nn.ModuleList(
            [PreNormBlock(c, cfg.heads, cfg.dec_dim_head or cfg.dim_head, mlp, cross=True, qkv_bias=cfg.qkv_bias,
                          scale=scale) for _ in range(cfg.dec_depth)])
        self.head = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True),
                                  nn.Conv2d(c, cfg.num_classes, 3, padding=1))

    def load_backbone(self, path: str | Path) -> None:
        """torchvision-layout ResNet weights (ImageNet) for the siamese backbone."""
        self.backbone.load_pretrained(path)

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
