"""Vision Transformers shared by the model zoo, plus a minimal LoRA linear layer.

* :class:`ClipViT` - a CLIP-style ViT (patch conv, [CLS] token, learned positions, pre-norm blocks of
  :class:`.attention.PreNormBlock`): DFM's vision encoder (ViT-B/32 in its baseline RSCaMa). Its
  parameter names follow OpenAI CLIP's ``visual`` tower where they exist (``conv1``, ``class_embedding``,
  ``positional_embedding``, ``ln_pre``, ``ln_post``); :mod:`.pretrained` maps OpenAI/open_clip and Hugging
  Face CLIP checkpoints onto it. Unlike CLIP, ``ln_post`` is applied to every token (CLIP: [CLS] only) and
  CLIP's output projection ``proj`` is not used (DFM works in the ViT width).
* :class:`SamViT` - the image encoder of Segment Anything (Kirillov et al. 2023): patch 16, absolute
  positions for a ``img_size`` grid, windowed blocks with global blocks at ``global_attn_indexes``,
  decomposed relative positions, and the 256-channel conv neck. Parameter names follow SAM's
  ``image_encoder`` so a local SAM checkpoint loads with :func:`load_sam_encoder` (prefix stripped).
  Its attention keeps SAM's fused ``qkv`` linear (where LoRA goes) and the relative-position bias, so it
  is not :class:`..attention.MultiHeadAttention`.
* :class:`LoRALinear` - ``W x + (alpha / r) * B A dropout(x)`` with ``A`` Kaiming-uniform and ``B`` zero
  (Hu et al. 2021). It IS an ``nn.Linear`` (``weight``/``bias`` keep their names), so pretrained keys
  load unchanged and only ``lora_a``/``lora_b`` are new.

Nothing here downloads: weights come from local files only.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .attention import PreNormBlock
from .backbones import load_state_file


# ---- LoRA -------------------------------------------------------------------------------------------

class LoRALinear(nn.Linear):
    """A frozen-able linear layer with a low-rank trainable update (merged weights are not kept)."""

    def __init__(self, in_features: int, out_features: int, r: int = 16, alpha: float = 32.0,
                 dropout: float = 0.05, bias: bool = True) -> None:
        super().__init__(in_features, out_features, bias=bias)
        if r < 1:
            raise ValueError("LoRA rank must be >= 1")
        self.r, self.scaling = r, alpha / r
        self.lora_a = nn.Linear(in_features, r, bias=False)
        self.lora_b = nn.Linear(r, out_features, bias=False)
        self.lora_dropout = nn.Dropout(dropout)
        nn.init.kaiming_uniform_(self.lora_a.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_b.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + self.lora_b(self.lora_a(self.lora_dropout(x))) * self.scaling

    def freeze_base(self) -> None:
        """Only the LoRA factors train (the paper's setting)."""
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)


def linear(in_features: int, out_features: int, lora_r: int, lora_alpha: float, lora_dropout: float,
           bias: bool = True) -> nn.Linear:
    if lora_r > 0:
        return LoRALinear(in_features, out_features, lora_r, lora_alpha, lora_dropout, bias)
    return nn.Linear(in_features, out_features, bias=bias)


def resize_pos_grid(pos: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(1, H, W, C) absolute position table -> (1, h, w, C), bicubic (identity when sizes match)."""
    if pos.shape[1:3] == (h, w):
        return pos
    return F.interpolate(pos.permute(0, 3, 1, 2), size=(h, w), mode="bicubic",
                         align_corners=False).permute(0, 2, 3, 1)


# ---- CLIP-style ViT (DFM) -----------------------------------------------------------------------------

class ClipViT(nn.Module):
    """``forward(x)`` -> tokens (B, 1 + h*w, width), [CLS] first, after the final LayerNorm."""

    def __init__(self, in_channels: int = 3, patch: int = 32, width: int = 768, layers: int = 12,
                 heads: int = 12, mlp_ratio: int = 4, grid: int = 7, activation: str = "gelu") -> None:
        super().__init__()
        self.patch, self.width, self.grid = patch, width, grid
        self.conv1 = nn.Conv2d(in_channels, width, patch, stride=patch, bias=False)
        scale = width ** -0.5
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(1 + grid * grid, width))
        self.ln_pre = nn.LayerNorm(width)
        self.blocks = nn.ModuleList([PreNormBlock(width, heads, width // heads, mlp_ratio * width, cross=False,
                                                  activation=activation) for _ in range(layers)])
        self.ln_post = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        x = self.conv1(x)
        h, w = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        pos_cls, pos_grid = self.positional_embedding[:1], self.positional_embedding[1:]
        grid = pos_grid.reshape(1, self.grid, self.grid, -1)
        pos = torch.cat([pos_cls, resize_pos_grid(grid, h, w).reshape(h * w, -1)], 0)
        x = self.ln_pre(torch.cat([cls, x], 1) + pos)
        for blk in self.blocks:
            x = blk(x)
        return self.ln_post(x), (h, w)


# ---- SAM ViT (Semantic-CC) ----------------------------------------------------------------------------

class LayerNorm2d(nn.Module):
    """LayerNorm over the channels of a (B, C, H, W) map (SAM's neck, ViTDet's SimpleFPN)."""

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


def rel_pos_table(q_size: int, k_size: int, rel_pos: torch.Tensor) -> torch.Tensor:
    """Relative-position embeddings for every (query, key) offset along one axis -> (q, k, C); the
    stored table (L, C) is linearly resized when it was trained for another size."""
    length = 2 * max(q_size, k_size) - 1
    if rel_pos.shape[0] != length:
        rel_pos = F.interpolate(rel_pos.t()[None], size=length, mode="linear", align_corners=False)[0].t()
    q = torch.arange(q_size, device=rel_pos.device)[:, None] * max(k_size / q_size, 1.0)
    k = torch.arange(k_size, device=rel_pos.device)[None, :] * max(q_size / k_size, 1.0)
    idx = (q - k) + (k_size - 1) * max(q_size / k_size, 1.0)
    return rel_pos[idx.long()]


class SamAttention(nn.Module):
    """Multi-head attention with SAM's fused qkv (optionally LoRA) and decomposed relative positions."""

    def __init__(self, dim: int, heads: int, input_size: tuple[int, int], lora_r: int = 0,
                 lora_alpha: float = 32.0, lora_dropout: float = 0.05) -> None:
        super().__init__()
        self.heads, self.dim_head = heads, dim // heads
        self.qkv = linear(dim, 3 * dim, lora_r, lora_alpha, lora_dropout)
        self.proj = nn.Linear(dim, dim)
        self.rel_pos_h = nn.Parameter(torch.zeros(2 * input_size[0] - 1, self.dim_head))
        self.rel_pos_w = nn.Parameter(torch.zeros(2 * input_size[1] - 1, self.dim_head))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, _ = x.shape
        qkv = self.qkv(x).reshape(b, h * w, 3, self.heads, self.dim_head).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]  # (B, heads, N, dh)
        rh = rel_pos_table(h, h, self.rel_pos_h).to(q.dtype)
        rw = rel_pos_table(w, w, self.rel_pos_w).to(q.dtype)
        rq = q.reshape(b, self.heads, h, w, self.dim_head)
        bias = (torch.einsum("bnhwc,hkc->bnhwk", rq, rh)[..., :, None]
                + torch.einsum("bnhwc,wkc->bnhwk", rq, rw)[..., None, :])
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.reshape(b, self.heads, h * w, h * w))
        return self.proj(out.transpose(1, 2).reshape(b, h, w, -1))


def window_partition(x: torch.Tensor, win: int) -> tuple[torch.Tensor, tuple[int, int]]:
    b, h, w, c = x.shape
    ph, pw = (win - h % win) % win, (win - w % win) % win
    if ph or pw:
        x = F.pad(x, (0, 0, 0, pw, 0, ph))
    hp, wp = h + ph, w + pw
    x = x.view(b, hp // win, win, wp // win, win, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, win, win, c), (hp, wp)


def window_unpartition(x: torch.Tensor, win: int, padded: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    hp, wp = padded
    b = x.shape[0] // ((hp // win) * (wp // win))
    x = x.view(b, hp // win, wp // win, win, win, -1).permute(0, 1, 3, 2, 4, 5).reshape(b, hp, wp, -1)
    return x[:, : size[0], : size[1]].contiguous()


class SamBlock(nn.Module):
    """SAM ViT block: pre-norm (windowed or global) attention + MLP, GELU."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, window: int, grid: int, lora_r: int,
                 lora_alpha: float, lora_dropout: float) -> None:
        super().__init__()
        self.window = window
        size = (window, window) if window > 0 else (grid, grid)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = SamAttention(dim, heads, size, lora_r, lora_alpha, lora_dropout)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential()
        self.mlp.add_module("lin1", nn.Linear(dim, hidden))
        self.mlp.add_module("act", nn.GELU())
        self.mlp.add_module("lin2", nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.norm1(x)
        if self.window > 0:
            size = x.shape[1:3]
            x, padded = window_partition(x, self.window)
            x = window_unpartition(self.attn(x), self.window, padded, size)
        else:
            x = self.attn(x)
        x = shortcut + x
        return x + self.mlp(self.norm2(x))


# SAM's image-encoder sizes (Kirillov et al. 2023, Table/Appendix; segment_anything's build_sam)
SAM_VARIANTS: dict[str, dict] = {
    "vit_b": {"embed_dim": 768, "depth": 12, "heads": 12, "global_attn_indexes": (2, 5, 8, 11)},
    "vit_l": {"embed_dim": 1024, "depth": 24, "heads": 16, "global_attn_indexes": (5, 11, 17, 23)},
    "vit_h": {"embed_dim": 1280, "depth": 32, "heads": 16, "global_attn_indexes": (7, 15, 23, 31)},
}


class SamViT(nn.Module):
    """SAM image encoder. ``blocks_forward`` exposes the block loop so callers (Semantic-CC's BCSF) can act
    after chosen blocks; ``neck`` maps (B, C, h, w) to SAM's 256-channel embedding."""

    def __init__(self, img_size: int = 1024, patch: int = 16, in_channels: int = 3, embed_dim: int = 768,
                 depth: int = 12, heads: int = 12, mlp_ratio: float = 4.0, out_chans: int = 256,
                 window: int = 14, global_attn_indexes: tuple[int, ...] = (2, 5, 8, 11), lora_r: int = 0,
                 lora_alpha: float = 32.0, lora_dropout: float = 0.05) -> None:
        super().__init__()
        self.patch, self.embed_dim = patch, embed_dim
        grid = img_size // patch
        self.global_attn_indexes = tuple(global_attn_indexes)
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(in_channels, embed_dim, patch, stride=patch)
        self.pos_embed = nn.Parameter(torch.zeros(1, grid, grid, embed_dim))
        self.blocks = nn.ModuleList([
            SamBlock(embed_dim, heads, mlp_ratio, 0 if i in self.global_attn_indexes else window, grid,
                     lora_r, lora_alpha, lora_dropout) for i in range(depth)])
        self.neck = nn.Sequential(nn.Conv2d(embed_dim, out_chans, 1, bias=False), LayerNorm2d(out_chans),
                                  nn.Conv2d(out_chans, out_chans, 3, padding=1, bias=False), LayerNorm2d(out_chans))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, h, w, embed_dim) patch tokens with positions."""
        x = self.patch_embed.proj(x).permute(0, 2, 3, 1)
        return x + resize_pos_grid(self.pos_embed, x.shape[1], x.shape[2]).to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        for blk in self.blocks:
            x = blk(x)
        return self.neck(x.permute(0, 3, 1, 2))

    def freeze_pretrained(self) -> None:
        """Freeze everything that a SAM checkpoint provides; LoRA factors stay trainable."""
        for name, p in self.named_parameters():
            if ".lora_" not in name:
                p.requires_grad_(False)


def load_sam_encoder(encoder: SamViT, path: str | Path) -> None:
    """Load SAM's ``image_encoder.*`` tensors from a LOCAL checkpoint (safetensors or weights-only torch
    file; a full SAM checkpoint or an image-encoder-only one). Absolute and relative position tables are
    resized when the checkpoint was trained for another ``img_size``. LoRA factors are not in SAM files
    and keep their initialisation; every other encoder tensor must be present."""
    state = load_state_file(path)
    if any(k.startswith("image_encoder.") for k in state):
        state = {k[len("image_encoder."):]: v for k, v in state.items() if k.startswith("image_encoder.")}
    own = encoder.state_dict()
    fixed: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        if k not in own:
            continue
        if k == "pos_embed" and v.shape != own[k].shape:
            v = resize_pos_grid(v.float(), own[k].shape[1], own[k].shape[2])
        elif ".rel_pos_" in k and v.shape != own[k].shape:
            v = F.interpolate(v.float().t()[None], size=own[k].shape[0], mode="linear", align_corners=False)[0].t()
        fixed[k] = v.to(own[k].dtype)
    missing = [k for k in own if k not in fixed and ".lora_" not in k]
    if missing:
        raise ValueError(f"{path}: not a SAM image-encoder checkpoint for this size; {len(missing)} tensors "
                         f"missing, e.g. {missing[:3]}")
    encoder.load_state_dict(fixed, strict=False)
