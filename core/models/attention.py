"""Attention building blocks shared by every model (BIT, Pix4Cap, the caption decoder, later SEN/DFM).

One multi-head attention implementation with keys/values that can be computed separately, so decoders
can cache them (self-attention K/V grow one token per step; cross-attention K/V of the visual memory
are computed once per decode). Masks follow PyTorch's convention: ``key_padding_mask`` True = ignore.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

KV = tuple[torch.Tensor, torch.Tensor]  # (B, heads, S, dim_head) each


class MultiHeadAttention(nn.Module):
    """Multi-head (cross-)attention, Eq. 4-6 of Pix4Cap / Vaswani et al.

    ``dim_head`` defaults to ``dim // heads``; BIT uses a wider inner dimension (8 heads x 64 on a 32-d
    feature), which is why it is a separate argument. ``kv_dim`` lets the context have another width.
    ``qkv_bias`` (default: ``bias``) and ``scale`` (default 1/sqrt(dim_head)) let published weights that were
    trained otherwise (BIT: no q/k/v bias, 1/sqrt(dim)) run unchanged.
    """

    def __init__(self, dim: int, heads: int = 8, dim_head: int | None = None, dropout: float = 0.0,
                 kv_dim: int | None = None, bias: bool = True, qkv_bias: bool | None = None,
                 scale: float | None = None) -> None:
        super().__init__()
        if dim_head is None:
            if dim % heads:
                raise ValueError(f"dim {dim} is not divisible by heads {heads}")
            dim_head = dim // heads
        self.heads, self.dim_head, self.dropout = heads, dim_head, dropout
        self.scale = scale  # None: 1/sqrt(dim_head)
        inner = heads * dim_head
        kv_dim = kv_dim or dim
        qkv_bias = bias if qkv_bias is None else qkv_bias
        self.to_q = nn.Linear(dim, inner, bias=qkv_bias)
        self.to_k = nn.Linear(kv_dim, inner, bias=qkv_bias)
        self.to_v = nn.Linear(kv_dim, inner, bias=qkv_bias)
        self.to_out = nn.Linear(inner, dim, bias=bias)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        return x.view(b, n, self.heads, self.dim_head).transpose(1, 2)

    def project_kv(self, context: torch.Tensor) -> KV:
        """Keys and values of a context (B, S, kv_dim) -> two (B, heads, S, dim_head) tensors."""
        return self._split(self.to_k(context)), self._split(self.to_v(context))

    def attend(self, query: torch.Tensor, kv: KV, key_padding_mask: torch.Tensor | None = None,
               causal: bool = False) -> torch.Tensor:
        """Attention of ``query`` (B, T, dim) over pre-projected ``kv``; returns (B, T, dim)."""
        q = self._split(self.to_q(query))
        k, v = kv
        mask = None
        if key_padding_mask is not None:
            mask = (~key_padding_mask.bool())[:, None, None, :]
        if causal and mask is not None:
            t, s = q.shape[-2], k.shape[-2]
            mask = mask & torch.ones(t, s, dtype=torch.bool, device=q.device).tril(s - t)
            causal = False
        p = self.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, is_causal=causal, scale=self.scale)
        b, _, t, _ = out.shape
        return self.to_out(out.transpose(1, 2).reshape(b, t, self.heads * self.dim_head))

    def forward(self, query: torch.Tensor, context: torch.Tensor | None = None,
                key_padding_mask: torch.Tensor | None = None, causal: bool = False) -> torch.Tensor:
        """Self-attention when ``context`` is None, else cross-attention to ``context``."""
        kv = self.project_kv(query if context is None else context)
        return self.attend(query, kv, key_padding_mask, causal)


class QuickGELU(nn.Module):
    """``x * sigmoid(1.702 x)``: the GELU approximation OpenAI's CLIP was trained with (its weights need it)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "gelu": nn.GELU, "quick_gelu": QuickGELU}


class FeedForward(nn.Module):
    """Position-wise MLP (Linear -> activation -> dropout -> Linear); ``activation`` names an :data:`ACTIVATIONS`."""

    def __init__(self, dim: int, hidden: int, dropout: float = 0.0, activation: str = "relu") -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; known: {sorted(ACTIVATIONS)}")
        act = ACTIVATIONS[activation]
        self.net = nn.Sequential(nn.Linear(dim, hidden), act(), nn.Dropout(dropout), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def sinusoidal_table(length: int, dim: int) -> torch.Tensor:
    """The fixed sin/cos position table of Vaswani et al. (length, dim); needs no weights in the file."""
    pos = torch.arange(length, dtype=torch.float32)[:, None]
    div = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(length, dim)
    table[:, 0::2] = torch.sin(pos * div)
    table[:, 1::2] = torch.cos(pos * div)[:, : dim // 2]
    return table


class LearnedPosition2D(nn.Module):
    """Learned row + column embeddings for a token grid (as RSICCformer), valid for any grid up to
    ``max_size`` per side, so the same model runs on 128 px and 512 px tiles."""

    def __init__(self, dim: int, max_size: int = 64) -> None:
        super().__init__()
        self.max_size = max_size
        self.rows = nn.Embedding(max_size, dim)
        self.cols = nn.Embedding(max_size, dim)

    def forward(self, h: int, w: int) -> torch.Tensor:
        """(h*w, dim) embeddings in row-major order (matching ``flatten(2)`` of a (B, C, h, w) map)."""
        if h > self.max_size or w > self.max_size:
            raise ValueError(f"token grid {h}x{w} exceeds the position table ({self.max_size} per side); "
                             "use smaller tiles")
        r = self.rows(torch.arange(h, device=self.rows.weight.device))
        c = self.cols(torch.arange(w, device=self.cols.weight.device))
        return (r[:, None, :] + c[None, :, :]).reshape(h * w, -1)


class CrossAttentionBlock(nn.Module):
    """Post-norm cross-attention + FFN: ``h = LN(x + MHA(x, ctx, ctx))``, output ``LN(h + FFN(h))``.

    The block SEN's CAGD (Eq. 6-7) and DFM's prior injection (Eq. 10) share.
    """

    def __init__(self, d: int, heads: int, ffn_dim: int, dropout: float) -> None:
        super().__init__()
        self.attn = MultiHeadAttention(d, heads, dropout=dropout)
        self.ffn = FeedForward(d, ffn_dim, dropout)
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x + self.drop(self.attn(x, context)))
        return self.norm2(h + self.drop(self.ffn(h)))


class PreNormBlock(nn.Module):
    """x + Attn(LN(x), LN(ctx)) then x + MLP(LN(x)); self-attention when no context is given.

    The pre-norm block of BIT's encoder/decoder, the CLIP-style ViT, DFM and Semantic-CC.
    """

    def __init__(self, dim: int, heads: int, dim_head: int, mlp_dim: int, cross: bool,
                 activation: str = "gelu", qkv_bias: bool = True, scale: float | None = None) -> None:
        super().__init__()
        self.norm_q, self.norm_ff = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.norm_ctx = nn.LayerNorm(dim) if cross else None
        self.attn = MultiHeadAttention(dim, heads, dim_head, qkv_bias=qkv_bias, scale=scale)
        self.ff = FeedForward(dim, mlp_dim, activation=activation)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        q = self.norm_q(x)
        ctx = self.norm_ctx(context) if self.norm_ctx is not None and context is not None else None
        x = x + self.attn(q, ctx)
        return x + self.ff(self.norm_ff(x))
