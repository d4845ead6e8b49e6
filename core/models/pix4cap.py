"""Pix4Cap: pixel-level change-detection pseudo-labels for change captioning (Liu et al., IGARSS 2024).

Two branches on one shared siamese ResNet:

* CD branch (Sec. 2.2): a BTF module per scale, ``Phi = Conv(Concat[X1, X2, X2 - X1])`` (Eq. 1-2), and a
  UNet-like head that fuses the BTF maps bottom-up with transposed convolutions, ending in 2 classes at
  input resolution.
* Caption branch (Sec. 2.3): the SFA module builds ``X_dif = W(X2 - X1) + b + Cos(X1, X2)`` (Eq. 3) from
  the last-stage tokens, then multi-head cross-attention (Eq. 4-6) fuses the last BTF map ``X_f^4`` into
  it; the resulting visual tokens feed the shared Transformer caption decoder with residual connection.

Choices the paper leaves open, made here and recorded in the config: BTF conv is 3x3 + BN + ReLU; the SFA
layer is [cross-attn to X_f^4 (the "first" cross-attention the ablation removes), cross-attn to the
bi-temporal tokens [X1; X2] so the decoder still sees what the scene contains, FFN], each post-norm with
residuals; tokens carry learned row/column positions; the caption decoder has 1 layer (RSICCformer's
default, and SEN's ablation found N_d = 1 best). "ResNet32" is read as ResNet-34 (see backbones.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .attention import FeedForward, LearnedPosition2D, MultiHeadAttention
from .backbones import build_backbone
from .caption_decoder import CaptionDecoder
from .network import ChangeNetwork


@dataclass
class Pix4CapConfig:
    backbone: str = "resnet34"
    backbone_stages: int = 4
    backbone_frozen: int = 0  # efficientnet-lite0: stem + this many blocks keep their pretrained weights
    in_channels: int = 3
    btf_channels: tuple[int, ...] | None = None  # None: same widths as the backbone stages
    btf_kernel: int = 3
    head_channels: int = 32  # CD head width above stride 4
    num_classes: int = 2
    d_model: int = 512
    heads: int = 8
    ffn_dim: int = 2048
    sfa_layers: int = 1
    decoder_layers: int = 1
    dropout: float = 0.1
    vocab_size: int = 500  # replaced by len(vocabulary) when built through the registry
    max_caption_length: int = 40
    layer_residual: bool = True
    tie_embeddings: bool = False
    max_grid: int = 64  # position table size per side of the last-stage token grid


def conv_bn_relu(cin: int, cout: int, k: int = 3) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


def deconv_bn_relu(cin: int, cout: int) -> nn.Sequential:
    """2x upsampling by a transposed convolution (the paper's "deconvolution")."""
    return nn.Sequential(nn.ConvTranspose2d(cin, cout, 2, stride=2, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


class BTF(nn.Module):
    """Bi-temporal fusion, Eq. 1-2: Conv(Concat[X1, X2, X2 - X1])."""

    def __init__(self, cin: int, cout: int, k: int = 3) -> None:
        super().__init__()
        self.conv = conv_bn_relu(3 * cin, cout, k)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat([x1, x2, x2 - x1], 1))


class UNetChangeHead(nn.Module):
    """Bottom-up decoder over the BTF maps (fine -> coarse order in ``channels``) to class logits."""

    def __init__(self, channels: tuple[int, ...], head_channels: int, num_classes: int) -> None:
        super().__init__()
        self.ups = nn.ModuleList()
        self.fuse = nn.ModuleList()
        for i in range(len(channels) - 1, 0, -1):
            self.ups.append(deconv_bn_relu(channels[i], channels[i - 1]))
            self.fuse.append(conv_bn_relu(2 * channels[i - 1], channels[i - 1]))
        # stride 4 -> 1: two more deconvolutions, then a 1x1 classifier
        self.head = nn.Sequential(deconv_bn_relu(channels[0], head_channels),
                                  deconv_bn_relu(head_channels, head_channels),
                                  nn.Conv2d(head_channels, num_classes, 1))

    def forward(self, feats: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        y = feats[-1]
        for up, fuse, skip in zip(self.ups, self.fuse, reversed(feats[:-1])):
            y = up(y)
            if y.shape[-2:] != skip.shape[-2:]:  # odd tile sizes
                y = F.interpolate(y, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            y = fuse(torch.cat([y, skip], 1))
        y = self.head(y)
        if y.shape[-2:] != tuple(size):
            y = F.interpolate(y, size=size, mode="bilinear", align_corners=False)
        return y


class SFALayer(nn.Module):
    """Cross-attend to the CD feature X_f^4, then to the bi-temporal tokens, then FFN (post-norm)."""

    def __init__(self, d: int, heads: int, ffn_dim: int, dropout: float) -> None:
        super().__init__()
        self.cd_attn = MultiHeadAttention(d, heads, dropout=dropout)
        self.ctx_attn = MultiHeadAttention(d, heads, dropout=dropout)
        self.ffn = FeedForward(d, ffn_dim, dropout)
        self.norms = nn.ModuleList([nn.LayerNorm(d) for _ in range(3)])
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, cd: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        x = self.norms[0](x + self.drop(self.cd_attn(x, cd)))
        x = self.norms[1](x + self.drop(self.ctx_attn(x, ctx)))
        return self.norms[2](x + self.drop(self.ffn(x)))


class SemanticFusionAugment(nn.Module):
    """SFA (Sec. 2.3): difference tokens (Eq. 3) enriched by the CD branch through cross-attention."""

    def __init__(self, in_channels: int, cd_channels: int, cfg: Pix4CapConfig) -> None:
        super().__init__()
        d = cfg.d_model
        self.diff = nn.Linear(in_channels, d)  # W, b of Eq. 3
        self.ctx = nn.Linear(in_channels, d)
        self.cd = nn.Linear(cd_channels, d)
        self.pos = LearnedPosition2D(d, cfg.max_grid)
        self.time = nn.Parameter(torch.zeros(2, d))  # tells the two dates apart in [X1; X2]
        self.layers = nn.ModuleList([SFALayer(d, cfg.heads, cfg.ffn_dim, cfg.dropout) for _ in range(cfg.sfa_layers)])

    def forward(self, x1: torch.Tensor, x2: torch.Tensor, xf: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) last-stage maps of both dates and the last BTF map -> tokens (B, h*w, d)."""
        h, w = x1.shape[-2:]
        t1, t2 = x1.flatten(2).transpose(1, 2), x2.flatten(2).transpose(1, 2)
        pos = self.pos(h, w)
        cos = F.cosine_similarity(t1, t2, dim=-1, eps=1e-6).unsqueeze(-1)
        x = self.diff(t2 - t1) + cos + pos  # Eq. 3 (+ positions)
        cd = self.cd(xf.flatten(2).transpose(1, 2)) + pos
        ctx = torch.cat([self.ctx(t1) + pos + self.time[0], self.ctx(t2) + pos + self.time[1]], 1)
        for layer in self.layers:
            x = layer(x, cd, ctx)
        return x


@dataclass
class Pix4CapFeatures:
    """Output of :meth:`Pix4Cap.encode`, shared by the CD head and the caption decoder."""

    btf: list[torch.Tensor]
    last: tuple[torch.Tensor, torch.Tensor]  # last-stage backbone features of both dates (SFA's input)
    size: tuple[int, int]


class Pix4Cap(ChangeNetwork):
    """Pix4Cap on normalised inputs: ``forward(before, after, tokens)`` -> (cd_logits, caption_logits)."""

    can_caption = True

    def __init__(self, cfg: Pix4CapConfig | None = None) -> None:
        super().__init__()
        cfg = cfg or Pix4CapConfig()
        self.cfg = cfg
        self.backbone = build_backbone(cfg.backbone, cfg.in_channels, cfg.backbone_stages, 32,
                                       frozen=cfg.backbone_frozen)
        chans = self.backbone.channels
        btf = tuple(cfg.btf_channels) if cfg.btf_channels else chans
        if len(btf) != len(chans):
            raise ValueError(f"btf_channels needs {len(chans)} entries, got {btf}")
        self.btf = nn.ModuleList([BTF(c, o, cfg.btf_kernel) for c, o in zip(chans, btf)])
        self.cd_head = UNetChangeHead(btf, cfg.head_channels, cfg.num_classes)
        self.sfa = SemanticFusionAugment(chans[-1], btf[-1], cfg)
        self.decoder = CaptionDecoder(cfg.vocab_size, cfg.d_model, cfg.heads, cfg.decoder_layers, cfg.ffn_dim,
                                      cfg.dropout, cfg.max_caption_length, cfg.layer_residual, cfg.tie_embeddings)

    def load_backbone(self, path: str | Path) -> None:
        """The siamese backbone's weights: a torchvision-layout ResNet file, or EfficientNet-Lite0 weights
        (``"imagenet"``: the installed package's)."""
        self.backbone.load_pretrained(path)

    def encode(self, before: torch.Tensor, after: torch.Tensor) -> Pix4CapFeatures:
        b = before.shape[0]
        feats = self.backbone(torch.cat([before, after], 0))  # siamese: one pass, shared weights
        f1, f2 = [f[:b] for f in feats], [f[b:] for f in feats]
        btf = [m(a, c) for m, a, c in zip(self.btf, f1, f2)]
        return Pix4CapFeatures(btf, (f1[-1], f2[-1]), (before.shape[-2], before.shape[-1]))

    def change_logits(self, feats: Pix4CapFeatures) -> torch.Tensor:
        return self.cd_head(feats.btf, feats.size)

    def caption_memory(self, feats: Pix4CapFeatures) -> tuple[torch.Tensor, torch.Tensor | None]:
        """SFA visual tokens (B, N, d_model); computed only when captions are wanted (mask-only runs skip it)."""
        return self.sfa(feats.last[0], feats.last[1], feats.btf[-1]), None

    def forward(self, before: torch.Tensor, after: torch.Tensor,
                tokens: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``tokens`` (B, T) decoder inputs (<START> w1 .. ; i.e. ``caps[:, :-1]``) -> CD logits (B, 2, H, W)
        and caption logits (B, T, V) predicting ``caps[:, 1:]``; no tokens -> caption logits None.

        ``tokens`` may hold n captions per pair ((n*B, T), pair-major: rows i*n .. i*n+n-1 belong to pair i);
        the visual tokens are then repeated, not re-encoded."""
        feats = self.encode(before, after)
        cap = None
        if tokens is not None:
            memory = self.caption_memory(feats)[0]
            b = memory.shape[0]
            if tokens.shape[0] != b:
                if tokens.shape[0] % b:
                    raise ValueError(f"{tokens.shape[0]} captions for {b} image pairs")
                memory = memory.repeat_interleave(tokens.shape[0] // b, dim=0)
            cap = self.decoder(tokens, memory)
        return self.change_logits(feats), cap

