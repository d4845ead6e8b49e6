"""Change-Agent's MCI model (Liu et al., TGRS 2024): change masks and captions of Chen-Yang-Liu/Change-Agent, layer
for layer, from ONE encoder pass.

Its published checkpoint imports into this architecture (``changescribe models import --from change-agent-mci``), so
it computes what the original computes:

* one MiT-B1 (:mod:`.mix_transformer`) encodes each date: four maps at strides 4..32 (64, 128, 320, 512 wide);
* two branches share those maps. The *change* branch adds a learned 2-D position code to both stride-32 maps (a
  column half and a row half, concatenated) and refines them with ``cd_layers`` pairs of difference-aware blocks,
  sequentially (``a += A(a, b)``, then ``b += B(b, a)`` with the new ``a``); the *caption* branch adds its own
  position code to the unrefined stride-32 maps and runs ``layers`` pairs of the same blocks in parallel and without
  the outer residual (``a, b = A(a, b), B(b, a)``);
* a difference-aware block (:class:`DifferenceBlock`): both inputs gain a multi-kernel depthwise branch (3x3, 1x5,
  5x1, BatchNorm, GELU, 1x1); keys and values come from ``conv-BN-ReLU(q * (ctx - q))`` (from ``ctx`` itself when the
  two are equal: the original checks this); post-norm attention whose residual is the query map, then FFN;
* the mask: per stage, ``[x1, BN(1x1(x2 - x1)) + cos(x1, x2), x2]`` -> 3x3 conv, BN, ReLU, 1x1 conv (2x wide); from
  the coarsest up, add the finer map and go through 1x1 conv, BN, ReLU and a 4x4 transposed convolution (x2);
  a last transposed convolution and a 1x1 give ``num_classes`` (3: no change, road, building) at input resolution;
* the caption: ``[a, b]`` -> 1x1 conv -> bottleneck residual block (RSICCformer's) -> the shared
  :class:`.caption_decoder.CaptionDecoder` with the outer residual per layer, sinusoidal positions and greedy
  decoding over ``max_caption_length - 1`` words (its sample() loop).

The original's predict script runs the whole encoder once for the caption and again for the mask; here the pipeline
runs it once per batch (:meth:`encode`) and both heads read its maps. ChangeScribe's change mask is binary:
:meth:`change_logits` gives (no change, the most likely change class), so the mask at 0.5 is exactly the original's
``argmax != no change``; :meth:`class_logits` keeps the three classes for callers that want them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .attention import FeedForward, MultiHeadAttention
from .caption_decoder import CaptionDecoder
from .mix_transformer import MIT_VARIANTS, MiTSpec, MixTransformer, to_grid, to_tokens
from .network import ChangeNetwork
from .rsiccformer import BottleneckFusion


@dataclass(frozen=True)
class ChangeAgentMCIConfig:
    backbone: str = "mit_b1"  # a MIT_VARIANTS name; Change-Agent's --network segformer-mit_b1
    in_channels: int = 3
    grid: int = 16  # position tables per side of the stride-32 map (its --feat_size): tiles up to 32 * grid px
    heads: int = 8  # every difference-aware block and the caption decoder (its --n_heads)
    layers: int = 3  # caption-branch block pairs (its --n_layers)
    cd_layers: int = 3  # change-branch block pairs (fixed in the original)
    num_classes: int = 3  # no change, road, building (LEVIR-MCI)
    d_model: int = 512  # the caption decoder's width (its --feature_dim)
    decoder_layers: int = 1
    dropout: float = 0.1  # inactive at inference
    vocab_size: int = 500
    max_caption_length: int = 42  # <START> + at most 41 words (its --max_length 41 decoding steps)


@dataclass
class ChangeAgentFeatures:
    """What :meth:`ChangeAgentMCI.encode` returns: each date's four MiT maps (the expensive, shared part)."""

    before: list[torch.Tensor]
    after: list[torch.Tensor]


class MultiKernelDepthwise(nn.Module):
    """``1x1(GELU(BN([dw3x3(x), dw1x5(x), dw5x1(x)])))``: the local branch each block adds to its inputs."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dw3 = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.dw1x5 = nn.Conv2d(dim, dim, (1, 5), padding=(0, 2), groups=dim)
        self.dw5x1 = nn.Conv2d(dim, dim, (5, 1), padding=(2, 0), groups=dim)
        self.norm = nn.BatchNorm2d(3 * dim)
        self.proj = nn.Conv2d(3 * dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.norm(torch.cat([self.dw3(x), self.dw1x5(x), self.dw5x1(x)], 1))))


class DifferenceBlock(nn.Module):
    """One difference-aware block on (B, C, H, W) maps: ``x`` asks, ``context`` answers (see the module docstring)."""

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.query_local = MultiKernelDepthwise(dim)
        self.context_local = MultiKernelDepthwise(dim)
        self.kv_fuse = nn.Sequential(nn.Conv2d(dim, dim, 1), nn.BatchNorm2d(dim), nn.ReLU())
        self.attn = MultiHeadAttention(dim, heads, dropout=dropout)
        self.ffn = FeedForward(dim, 4 * dim, dropout)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        q = x + self.query_local(x)
        c = context + self.context_local(context)
        kv = self.kv_fuse(q * (c - q))
        # The original takes keys and values from the context itself when query and context are identical (it
        # compares its whole batch; per pair here, which is the same at its batch size of 1).
        same = (q == c).flatten(1).all(1)
        kv = torch.where(same[:, None, None, None], c, kv)
        qt = to_tokens(q)
        t = self.norm1(self.attn(qt, to_tokens(kv)) + qt)
        return to_grid(self.norm2(self.ffn(t) + t), h, w)


class GridPosition(nn.Module):
    """A learned position code for a (C, H, W) map: a column half and a row half, concatenated on channels."""

    def __init__(self, size: int, dim: int) -> None:
        super().__init__()
        self.cols = nn.Embedding(size, dim // 2)
        self.rows = nn.Embedding(size, dim // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        size = self.cols.num_embeddings
        if h > size or w > size:
            raise ValueError(f"a {h}x{w} stride-32 map exceeds the position tables ({size} per side): use tiles of "
                             f"at most {32 * size} px")
        cols = self.cols(torch.arange(w, device=x.device))[None, :, :].expand(h, w, -1)
        rows = self.rows(torch.arange(h, device=x.device))[:, None, :].expand(h, w, -1)
        return x + torch.cat([cols, rows], -1).permute(2, 0, 1)


def _pair(dim: int, heads: int, dropout: float) -> nn.ModuleList:
    return nn.ModuleList([DifferenceBlock(dim, heads, dropout), DifferenceBlock(dim, heads, dropout)])


class ChangeAgentMCI(ChangeNetwork):
    """Change-Agent's MCI model on normalised inputs; ``forward(before, after, tokens)`` -> (change logits (B, 2, H,
    W), caption logits (B, T, V)), as every captioner with a change head in the zoo."""

    can_caption = True

    def __init__(self, cfg: ChangeAgentMCIConfig | None = None) -> None:
        super().__init__()
        cfg = cfg or ChangeAgentMCIConfig()
        if cfg.backbone not in MIT_VARIANTS:
            raise ValueError(f"unknown MiT variant {cfg.backbone!r}; known: {', '.join(MIT_VARIANTS)}")
        self.cfg = cfg
        widths, heads, depths = MIT_VARIANTS[cfg.backbone]
        self.backbone = MixTransformer(MiTSpec(widths, heads, depths, in_channels=cfg.in_channels))
        top = widths[-1]
        # change branch
        self.cd_position = GridPosition(cfg.grid, top)
        self.cd_neck = nn.ModuleList([_pair(top, cfg.heads, cfg.dropout) for _ in range(cfg.cd_layers)])
        self.diff = nn.ModuleList([nn.Sequential(nn.Conv2d(c, c, 1), nn.BatchNorm2d(c)) for c in widths])
        self.fuse = nn.ModuleList([nn.Sequential(nn.Conv2d(3 * c, 2 * c, 3, padding=1), nn.BatchNorm2d(2 * c),
                                                 nn.ReLU(), nn.Conv2d(2 * c, 2 * c, 1)) for c in widths])
        finer = (widths[0], *widths[:-1])  # each level goes up to the width of the next finer one
        self.up = nn.ModuleList([nn.Sequential(nn.Conv2d(2 * c, 2 * c, 1), nn.BatchNorm2d(2 * c), nn.ReLU(),
                                               nn.ConvTranspose2d(2 * c, 2 * f, 4, stride=2, padding=1))
                                 for c, f in zip(widths, finer)])
        self.classify = nn.Sequential(nn.ConvTranspose2d(2 * widths[0], widths[0], 4, stride=2, padding=1),
                                      nn.Conv2d(widths[0], cfg.num_classes, 1))
        # caption branch
        self.cc_position = GridPosition(cfg.grid, top)
        self.cc_neck = nn.ModuleList([_pair(top, cfg.heads, cfg.dropout) for _ in range(cfg.layers)])
        self.cap_proj = nn.Conv2d(2 * top, cfg.d_model, 1)
        self.cap_fuse = BottleneckFusion(cfg.d_model)
        self.decoder = CaptionDecoder(cfg.vocab_size, cfg.d_model, cfg.heads, cfg.decoder_layers, 4 * cfg.d_model,
                                      cfg.dropout, cfg.max_caption_length, layer_residual=True)

    def encode(self, before: torch.Tensor, after: torch.Tensor) -> ChangeAgentFeatures:
        b = before.shape[0]
        maps = self.backbone(torch.cat([before, after], 0))  # one backbone pass for both dates
        return ChangeAgentFeatures([m[:b] for m in maps], [m[b:] for m in maps])

    def class_logits(self, feats: ChangeAgentFeatures) -> torch.Tensor:
        """(B, num_classes, H, W) logits of no change / road / building, as the original's segmentation output."""
        x1, x2 = list(feats.before), list(feats.after)
        a, b = self.cd_position(x1[-1]), self.cd_position(x2[-1])
        for block_a, block_b in self.cd_neck:
            a = block_a(a, b) + a
            b = block_b(b, a) + b
        x1[-1], x2[-1] = a, b
        fused = [fuse(torch.cat([p, diff(q - p) + F.cosine_similarity(p, q, dim=1)[:, None], q], 1))
                 for p, q, diff, fuse in zip(x1, x2, self.diff, self.fuse)]
        x = self.up[-1](fused[-1])
        for level in range(len(fused) - 2, -1, -1):
            x = self.up[level](fused[level] + x)
        return self.classify(x)

    def change_logits(self, feats: ChangeAgentFeatures) -> torch.Tensor:
        """(B, 2, H, W): (no change, the most likely change class): the change probability is above 0.5 exactly
        where the original's argmax is a change class."""
        logits = self.class_logits(feats)
        return torch.stack([logits[:, 0], logits[:, 1:].amax(1)], 1)

    def caption_memory(self, feats: ChangeAgentFeatures) -> tuple[torch.Tensor, torch.Tensor | None]:
        a, b = self.cc_position(feats.before[-1]), self.cc_position(feats.after[-1])
        for block_a, block_b in self.cc_neck:
            a, b = block_a(a, b), block_b(b, a)
        x = self.cap_fuse(self.cap_proj(torch.cat([a, b], 1)))
        return to_tokens(x), None

    def forward(self, before: torch.Tensor, after: torch.Tensor,
                tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``tokens`` (B, T) decoder inputs starting with <START> -> (change logits, caption logits (B, T, V)); with
        ``num_classes`` 2 the change logits are the class logits themselves (what ChangeScribe's binary masks train)."""
        feats = self.encode(before, after)
        return self.change_logits(feats), self.decoder(tokens, self.caption_memory(feats)[0])
