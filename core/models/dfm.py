"""DFM: Difference Feature Modeling with a Text-guided Gated Contrastive Loss for remote sensing image
change captioning (seed paper 002).

What the paper fixes and this module implements:

* a ViT vision encoder applied to both dates (siamese), giving patch tokens and a [CLS] token each;
* the **CLS-token difference embedding** used by the Text-guided Gated Contrastive Loss (TGCL): the
  difference of the two dates' [CLS] tokens (:meth:`DFM.contrastive_embedding`), the **projection layer**
  that maps the frozen sentence encoder's embeddings (All-MPNet-base-v2, 768-d) into that visual latent
  space (:meth:`DFM.project_text`) and the learnable logit scale of the similarity matrix
  (``logit_scale``, CLIP's initialisation 1/0.07). The loss (gating of "no change" captions, symmetric
  cross-entropy) belongs to training/ and is not here;
* a **pre-trained change-detection encoder**: a complete :class:`BitCD` lives in ``self.cd`` so
  the weights of any ``bit-cd`` model file load into it unchanged (the DFM recipe's ``load_cd_weights``), frozen by
  default ("stable change detection knowledge"). Because the whole BIT is inside, DFM also predicts the
  change mask (``change_logits`` = BIT's head) and needs no pairing;
* **Joint Feature Modeling** (Eq. 8-10): the direct difference of the raw ViT embeddings (Eq. 8) and the
  spatio-temporal features (Eq. 7) each receive the CD prior (Eq. 9) by cross-attention, are refined by
  bidirectional (non-causal, joint over both streams) self-attention, and fused with learnable
  softmax-normalised weights; the result feeds the shared Transformer caption decoder.

Documented interpretations (the stored paper text lost every symbol of its equations and its
hyper-parameter values):

* vision encoder = CLIP ViT-B/32 layout (patch 32, width 768, 12 layers, QuickGELU in the registered paper
  configuration), the encoder of DFM's baseline RSCaMa and the "CLIP" of the paper's ablation table; embedding
  dimension D = 768 (the ViT width, so no projection is needed). ``clip_checkpoint`` names a LOCAL CLIP
  checkpoint (OpenAI / open_clip ``ViT-B-32`` or a Hugging Face CLIP export) whose vision tower initialises the
  ViT (key mapping in :mod:`.pretrained`) when a recipe calls :meth:`DFM.load_pretrained`; TGCL trains the ViT,
  so the model file carries it and loading a model file does not read the checkpoint. ``vit_activation`` must
  match the checkpoint (OpenAI: ``quick_gelu``).
* Eq. 7's "feature extraction modules" (RSCaMa's Mamba layers; no state-space kernel here) are
  ``st_layers`` = 3 pre-norm Transformer layers over the tokens of both dates jointly (temporal embeddings
  tell them apart), followed by ``Linear([f1, f2, f2 - f1])`` -> D: the spatio-temporal difference tokens.
* Eq. 9's "output embeddings of the CD encoder" = BIT's refined pixel features of both dates (BIT's
  ``encode``), as ``[x1, x2, x2 - x1]`` average-pooled to a ``cd_grid`` x ``cd_grid`` token grid and
  linearly projected to D.
* Decoder: 1 layer, 8 heads, FFN 2048 (RSCaMa / RSICCformer defaults).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .attention import CrossAttentionBlock, LearnedPosition2D, PreNormBlock
from .caption_decoder import CaptionDecoder
from .bit_cd import BitCD, BitCDConfig, BitCDFeatures
from .network import ChangeNetwork
from .pretrained import load_clip_vision
from .vit import ClipViT


@dataclass
class DFMConfig:
    in_channels: int = 3
    # vision encoder (CLIP ViT-B/32 layout)
    vit_patch: int = 32
    vit_width: int = 768
    vit_layers: int = 12
    vit_heads: int = 12
    vit_grid: int = 7  # position table side (224 / 32 as CLIP); resized to the tile's grid
    vit_activation: str = "gelu"  # "quick_gelu" for OpenAI CLIP weights (the registered paper config)
    clip_checkpoint: str | None = None  # LOCAL CLIP weights that initialise the ViT (see module doc)
    # difference modelling
    d_model: int = 768
    heads: int = 8
    ffn_dim: int = 2048
    st_layers: int = 3  # Eq. 7 spatio-temporal layers
    jfm_layers: int = 1  # cross-attn (CD prior) + bidirectional self-attn rounds
    cd_grid: int = 16  # CD prior tokens per side
    # the pre-trained change detector (BitCDConfig fields that differ from bit-cd's defaults)
    cd_overrides: dict = field(default_factory=dict)
    freeze_cd: bool = True
    # TGCL heads
    text_dim: int = 768  # All-MPNet-base-v2 sentence embedding
    # caption decoder
    decoder_layers: int = 1
    dropout: float = 0.1
    vocab_size: int = 436
    max_caption_length: int = 40
    layer_residual: bool = True
    beam_size: int = 1
    max_grid: int = 64


class JointFeatureModeling(nn.Module):
    """Eq. 10: CrossAttn(stream, CD prior) for both streams -> bidirectional self-attention over the
    joint sequence [direct; spatio-temporal] -> weighted fusion with softmax(weights)."""

    def __init__(self, d: int, heads: int, ffn_dim: int, dropout: float, layers: int) -> None:
        super().__init__()
        self.inject_direct = nn.ModuleList([CrossAttentionBlock(d, heads, ffn_dim, dropout) for _ in range(layers)])
        self.inject_st = nn.ModuleList([CrossAttentionBlock(d, heads, ffn_dim, dropout) for _ in range(layers)])
        self.bidirectional = nn.ModuleList([PreNormBlock(d, heads, d // heads, ffn_dim, cross=False)
                                            for _ in range(layers)])
        self.stream = nn.Parameter(torch.zeros(2, d))  # tells the two streams apart in the joint sequence
        self.fusion_logits = nn.Parameter(torch.zeros(2))  # WF: equal weights at start

    def forward(self, direct: torch.Tensor, st: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
        n = direct.shape[1]
        for inj_d, inj_s, bi in zip(self.inject_direct, self.inject_st, self.bidirectional):
            direct, st = inj_d(direct, prior), inj_s(st, prior)
            joint = bi(torch.cat([direct + self.stream[0], st + self.stream[1]], 1))
            direct, st = joint[:, :n], joint[:, n:]
        w = self.fusion_logits.softmax(0)
        return w[0] * direct + w[1] * st


@dataclass
class DFMFeatures:
    """Output of :meth:`DFM.encode`: fused visual tokens, [CLS] tokens of both dates, BIT's features."""

    memory: torch.Tensor  # (B, N, D)
    cls: tuple[torch.Tensor, torch.Tensor]  # (B, width) each
    cd: BitCDFeatures


class DFM(ChangeNetwork):
    """DFM on normalised inputs; ``forward(before, after, tokens)`` -> (cd_logits, caption_logits)."""

    can_caption = True

    def __init__(self, cfg: DFMConfig | None = None) -> None:
        super().__init__()
        cfg = cfg or DFMConfig()
        self.cfg = cfg
        d = cfg.d_model
        self.vit = ClipViT(cfg.in_channels, cfg.vit_patch, cfg.vit_width, cfg.vit_layers, cfg.vit_heads,
                           grid=cfg.vit_grid, activation=cfg.vit_activation)
        bit_cfg = dataclasses.replace(BitCDConfig(), in_channels=cfg.in_channels, **dict(cfg.cd_overrides))
        self.cd = BitCD(bit_cfg)
        self.vis_proj = nn.Identity() if cfg.vit_width == d else nn.Linear(cfg.vit_width, d)
        self.pos = LearnedPosition2D(d, cfg.max_grid)
        self.time = nn.Parameter(torch.zeros(2, d))
        self.st_layers = nn.ModuleList([PreNormBlock(d, cfg.heads, d // cfg.heads, cfg.ffn_dim, cross=False)
                                        for _ in range(cfg.st_layers)])
        self.st_fuse = nn.Linear(3 * d, d)
        self.direct = nn.Linear(d, d)  # Eq. 8 difference embedding
        self.cd_proj = nn.Linear(3 * bit_cfg.feature_dim, d)
        self.cd_pos = LearnedPosition2D(d, max(cfg.cd_grid, 1))
        self.jfm = JointFeatureModeling(d, cfg.heads, cfg.ffn_dim, cfg.dropout, cfg.jfm_layers)
        self.text_proj = nn.Linear(cfg.text_dim, cfg.vit_width)  # TGCL: text -> visual latent space
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.decoder = CaptionDecoder(cfg.vocab_size, d, cfg.heads, cfg.decoder_layers, cfg.ffn_dim, cfg.dropout,
                                      cfg.max_caption_length, cfg.layer_residual)
        if cfg.freeze_cd:
            self.cd.requires_grad_(False)

    @property
    def default_beam_size(self) -> int:
        return self.cfg.beam_size

    def load_backbone(self, path: str | Path) -> None:
        """ImageNet ResNet weights for the CD encoder's backbone (the ViT's come from ``clip_checkpoint``)."""
        self.cd.load_backbone(path)

    def load_pretrained(self) -> None:
        """The ViT from ``clip_checkpoint`` when the config names one (the CD encoder's weights come from a bit-cd
        model file: the DFM recipe's ``load_cd_weights``)."""
        super().load_pretrained()
        if self.cfg.clip_checkpoint:
            self.load_clip_weights(self.cfg.clip_checkpoint)

    def train(self, mode: bool = True) -> "DFM":
        super().train(mode)
        if self.cfg.freeze_cd:  # a frozen pre-trained CD model keeps its BatchNorm statistics
            self.cd.eval()
        return self

    def load_clip_weights(self, path: str | Path) -> None:
        """Initialise the ViT from a LOCAL CLIP checkpoint (OpenAI / open_clip / Hugging Face layouts)."""
        load_clip_vision(self.vit, path, self.cfg.vit_activation)

    # ---- encoder -------------------------------------------------------------------------------------
    def _cd_prior(self, cd: BitCDFeatures) -> torch.Tensor:
        g = self.cfg.cd_grid
        x = torch.cat([cd.x1, cd.x2, cd.x2 - cd.x1], 1)
        x = F.adaptive_avg_pool2d(x, (g, g)).flatten(2).transpose(1, 2)
        return self.cd_proj(x) + self.cd_pos(g, g)

    def encode(self, before: torch.Tensor, after: torch.Tensor) -> DFMFeatures:
        b = before.shape[0]
        tokens, (h, w) = self.vit(torch.cat([before, after], 0))  # siamese, one pass
        cls, patches = tokens[:, 0], self.vis_proj(tokens[:, 1:])
        v1, v2 = patches[:b], patches[b:]
        pos = self.pos(h, w)
        direct = self.direct(v2 - v1) + pos  # Eq. 8
        x = torch.cat([v1 + pos + self.time[0], v2 + pos + self.time[1]], 1)  # Eq. 7
        for blk in self.st_layers:
            x = blk(x)
        f1, f2 = x[:, : h * w], x[:, h * w:]
        st = self.st_fuse(torch.cat([f1, f2, f2 - f1], -1))
        cd = self.cd.encode(before, after)  # Eq. 9
        memory = self.jfm(direct, st, self._cd_prior(cd))  # Eq. 10
        return DFMFeatures(memory, (cls[:b], cls[b:]), cd)

    def change_logits(self, feats: DFMFeatures) -> torch.Tensor:
        return self.cd.change_logits(feats.cd)

    def caption_memory(self, feats: DFMFeatures) -> tuple[torch.Tensor, torch.Tensor | None]:
        return feats.memory, None

    # ---- TGCL outputs --------------------------------------------------------------------------------
    def contrastive_embedding(self, feats: DFMFeatures) -> torch.Tensor:
        """The change representation of each pair for TGCL: [CLS](after) - [CLS](before), (B, vit_width)."""
        return feats.cls[1] - feats.cls[0]

    def project_text(self, text_embedding: torch.Tensor) -> torch.Tensor:
        """Frozen sentence-encoder embeddings (B, text_dim) -> the visual latent space (B, vit_width)."""
        return self.text_proj(text_embedding)

    def contrastive_embeddings(self, feats: DFMFeatures, text_embedding: torch.Tensor
                               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """TGCL's unit-length change and caption embeddings (B, vit_width) and the learnable logit scale
        ``exp(t)`` (clamped at 100 as in CLIP): apart, so training can gather them over processes first."""
        v = F.normalize(self.contrastive_embedding(feats), dim=-1)
        t = F.normalize(self.project_text(text_embedding), dim=-1)
        return v, t, self.logit_scale.exp().clamp(max=100.0)

    def contrastive_logits(self, feats: DFMFeatures, text_embedding: torch.Tensor) -> torch.Tensor:
        """The TGCL similarity matrix ``exp(t) * cos(v_i, t_j)`` (B_img, B_txt); gating and the symmetric
        cross-entropy are applied by the training loss."""
        v, t, scale = self.contrastive_embeddings(feats, text_embedding)
        return scale * v @ t.t()

    def forward(self, before: torch.Tensor, after: torch.Tensor, tokens: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        feats = self.encode(before, after)
        cap = None
        if tokens is not None:
            memory = feats.memory
            if tokens.shape[0] != memory.shape[0]:
                if tokens.shape[0] % memory.shape[0]:
                    raise ValueError(f"{tokens.shape[0]} captions for {memory.shape[0]} image pairs")
                memory = memory.repeat_interleave(tokens.shape[0] // memory.shape[0], dim=0)
            cap = self.decoder(tokens, memory)
        return self.change_logits(feats), cap
