"""SEN: Single-stream Extractor Network (Zhou, Gao, Yuan & Wang, "Single-stream Extractor Network with
Contrastive Pre-training for Remote Sensing Change Captioning", IEEE TGRS 2024).

Paper configuration (the defaults of :class:`SENConfig`):

* single-stream extractor: ONE ResNet-50 whose stem takes the 6-band stack ``Concat(I_aft, I_bef)``
  (Eq. 2), all four stages, features at stride 32 (h = H/32);
* ``P`` (Eq. 3): a 1x1 convolution 2048 -> D = 512;
* SFE (Eq. 4-5): a convolution ``Conv_s`` shared by both dates on the raw images, then one channel
  attention block per date, ``CA(I_c, F) = sigmoid(MLP(AP(I_c)) + MLP(MP(I_c))) x F``;
* learned 2-D position embeddings added to F_bef, F_aft (and F);
* CAGD (Eq. 6-14), N_e = 2 layers, each: a cross-attention block (post-norm MHA + FFN) shared by both
  dates, ``F_m`` querying the bi-temporal features, the difference ``F_aft^ - F_bef^``, a self-attention
  block (post-norm MHA, no FFN, Eq. 11) and the outer residual ``+ F_diff`` (Eq. 12);
* the shared :class:`CaptionDecoder` with N_d = 1 layer (Eq. 15-16: a plain stack, so
  ``layer_residual=False``), 8 heads, FFN 2048; inference uses beam search of size 3 (``beam_size``).

With the LEVIR-CC vocabulary (436 tokens) this is 39.3 M parameters (paper, Table I: 39.9 M); the
ResNet-50 + P part is 24.57 M, exactly the paper's "ResNet50 (24.57M)".

Documented interpretations (the paper leaves them open):

* ``Conv_s`` is a 32x32 convolution with stride 32 (3 -> D), i.e. it embeds each raw image on the same
  h x w grid as F ("shallow feature embedding"); the CBAM MLP uses reduction 16 (CBAM's default).
* Eq. 2 puts the AFTER image in the first three bands; Sec. III-B says pre-training placed the older
  image first. ``input_order`` follows Eq. 2 by default; set it to ``"before_after"`` for weights
  pre-trained the other way.
* heads (8), FFN width (4D) and dropout (0.1) follow RSICCformer, on which SEN builds.
* The paper fine-tunes from conv2_x on: ``freeze_stem`` freezes conv1/bn1 (requires_grad only).

SEN has no change-detection head: ``change_logits`` is absent and ``can_detect = False``; the pipeline
pairs it with a change detector (:class:`..pairing.PairedChangeModel`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .attention import CrossAttentionBlock, LearnedPosition2D, MultiHeadAttention
from .backbones import ResNetBackbone
from .caption_decoder import CaptionDecoder
from .network import ChangeNetwork


@dataclass
class SENConfig:
    backbone: str = "resnet50"
    backbone_stages: int = 4
    in_channels: int = 3  # bands of ONE image; the extractor's stem takes 2 * in_channels
    input_order: str = "after_before"  # Eq. 2: Concat(I_aft, I_bef)
    d_model: int = 512  # D
    sfe_kernel: int = 32  # Conv_s kernel = stride (the extractor's output stride)
    ca_reduction: int = 16
    cagd_layers: int = 2  # N_e
    heads: int = 8
    ffn_dim: int = 2048
    decoder_layers: int = 1  # N_d
    dropout: float = 0.1
    vocab_size: int = 436  # LEVIR-CC train vocabulary (min count 5) incl. the 4 specials
    max_caption_length: int = 40
    layer_residual: bool = False
    beam_size: int = 3  # the paper's inference beam (Fig. 6b)
    freeze_stem: bool = True
    max_grid: int = 64


class ChannelAttention(nn.Module):
    """Eq. 5 (CBAM's channel attention): weights from the shallow features ``I_c`` applied to ``F``."""

    def __init__(self, channels: int, reduction: int) -> None:
        super().__init__()
        hidden = max(1, channels // reduction)
        self.mlp = nn.Sequential(nn.Conv2d(channels, hidden, 1, bias=False), nn.ReLU(inplace=True),
                                 nn.Conv2d(hidden, channels, 1, bias=False))

    def forward(self, shallow: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
        avg = self.mlp(F.adaptive_avg_pool2d(shallow, 1))
        mx = self.mlp(F.adaptive_max_pool2d(shallow, 1))
        return torch.sigmoid(avg + mx) * feats


class ShallowFeatureEmbedding(nn.Module):
    """SFE (Eq. 4): shared ``Conv_s`` on each raw image, one channel attention per date."""

    def __init__(self, in_channels: int, d: int, kernel: int, reduction: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, d, kernel, stride=kernel)
        self.ca_before = ChannelAttention(d, reduction)
        self.ca_after = ChannelAttention(d, reduction)

    def forward(self, before: torch.Tensor, after: torch.Tensor, feats: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.ca_before(self.conv(before), feats), self.ca_after(self.conv(after), feats)


class SelfAttentionBlock(nn.Module):
    """Eq. 11: ``LN(MHA(x, x, x) + x)`` (no FFN)."""

    def __init__(self, d: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.attn = MultiHeadAttention(d, heads, dropout=dropout)
        self.norm = nn.LayerNorm(d)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x + self.drop(self.attn(x)))


class CAGDLayer(nn.Module):
    """One CAGD layer (Eq. 12-14): returns the next (F_bef, F_aft, F_diff)."""

    def __init__(self, d: int, heads: int, ffn_dim: int, dropout: float) -> None:
        super().__init__()
        self.cross = CrossAttentionBlock(d, heads, ffn_dim, dropout)  # shared by both dates
        self.self_attn = SelfAttentionBlock(d, heads, dropout)

    def forward(self, f_bef: torch.Tensor, f_aft: torch.Tensor, f_diff: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b = f_bef.shape[0]
        both = self.cross(torch.cat([f_bef, f_aft], 0), torch.cat([f_diff, f_diff], 0))  # one batched pass
        h_bef, h_aft = both[:b], both[b:]
        return h_bef, h_aft, self.self_attn(h_aft - h_bef) + f_diff


@dataclass
class SENFeatures:
    """What :meth:`SEN.encode` returns: the CAGD difference tokens F_diff^{N_e} (B, h*w, D)."""

    diff: torch.Tensor
    size: tuple[int, int]


class SEN(ChangeNetwork):
    """SEN on normalised inputs; ``forward(before, after, tokens)`` -> caption logits (B, T, V)."""

    can_caption = True
    can_detect = False

    def __init__(self, cfg: SENConfig | None = None) -> None:
        super().__init__()
        cfg = cfg or SENConfig()
        if cfg.input_order not in ("after_before", "before_after"):
            raise ValueError("input_order must be 'after_before' (Eq. 2) or 'before_after'")
        self.cfg = cfg
        self.extractor = ResNetBackbone(cfg.backbone, 2 * cfg.in_channels, cfg.backbone_stages, 32)
        d = cfg.d_model
        self.proj = nn.Conv2d(self.extractor.out_channels, d, 1)  # P
        self.sfe = ShallowFeatureEmbedding(cfg.in_channels, d, cfg.sfe_kernel, cfg.ca_reduction)
        self.pos = LearnedPosition2D(d, cfg.max_grid)
        self.cagd = nn.ModuleList([CAGDLayer(d, cfg.heads, cfg.ffn_dim, cfg.dropout) for _ in range(cfg.cagd_layers)])
        self.decoder = CaptionDecoder(cfg.vocab_size, d, cfg.heads, cfg.decoder_layers, cfg.ffn_dim, cfg.dropout,
                                      cfg.max_caption_length, cfg.layer_residual)
        if cfg.freeze_stem:
            for p in (*self.extractor.conv1.parameters(), *self.extractor.bn1.parameters()):
                p.requires_grad_(False)

    @property
    def default_beam_size(self) -> int:
        return self.cfg.beam_size

    def load_backbone(self, path: str | Path) -> None:
        """The single-stream extractor from a sen-pretrain file or torchvision-layout ResNet weights (the 3-band
        stem kernel is spread over the stacked pair's bands)."""
        self.extractor.load_pretrained(path)

    def encode(self, before: torch.Tensor, after: torch.Tensor) -> SENFeatures:
        pair = (after, before) if self.cfg.input_order == "after_before" else (before, after)
        feats = self.proj(self.extractor(torch.cat(pair, 1))[-1])  # F (B, D, h, w)
        h, w = feats.shape[-2:]
        f_bef, f_aft = self.sfe(before, after, feats)
        if f_bef.shape[-2:] != (h, w):  # tile sizes that are not a multiple of 32
            f_bef = F.adaptive_avg_pool2d(f_bef, (h, w))
            f_aft = F.adaptive_avg_pool2d(f_aft, (h, w))
        pos = self.pos(h, w)

        def tokens(x: torch.Tensor) -> torch.Tensor:
            return x.flatten(2).transpose(1, 2) + pos

        f_bef, f_aft, f_diff = tokens(f_bef), tokens(f_aft), tokens(feats)
        for layer in self.cagd:
            f_bef, f_aft, f_diff = layer(f_bef, f_aft, f_diff)
        return SENFeatures(f_diff, (before.shape[-2], before.shape[-1]))

    def caption_memory(self, feats: SENFeatures) -> tuple[torch.Tensor, torch.Tensor | None]:
        return feats.diff, None

    def forward(self, before: torch.Tensor, after: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """``tokens`` (n*B, T) decoder inputs (pair-major when n captions per pair) -> logits (n*B, T, V)."""
        memory = self.encode(before, after).diff
        if tokens.shape[0] != memory.shape[0]:
            if tokens.shape[0] % memory.shape[0]:
                raise ValueError(f"{tokens.shape[0]} captions for {memory.shape[0]} image pairs")
            memory = memory.repeat_interleave(tokens.shape[0] // memory.shape[0], dim=0)
        return self.decoder(tokens, memory)
