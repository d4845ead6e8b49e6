"""The one Transformer caption decoder every captioner in ChangeScribe uses (Pix4Cap now; SEN, DFM later).

Layout follows the RSICCformer / Pix4Cap decoder: word embedding + sinusoidal positions, N post-norm
layers of (masked self-attention, cross-attention to the visual tokens, FFN), then a linear classifier.
The "Transformer decoder with a residual connection" of Pix4Cap is implemented as an *outer* residual
around each layer, ``x_l = Layer_l(x_{l-1}) + x_{l-1}``, so the word embedding reaches the classifier
directly (``layer_residual=True``, as in the RSICCformer decoder layer); set False for a plain decoder.

Decoding (greedy and beam) keeps a KV cache: each step feeds only the newest token through the layers;
self-attention keys/values of earlier positions are reused and the memory's cross-attention keys/values
are projected once per call. Because the self-attention is causal, this is exactly the teacher-forced
computation, just without re-decoding the prefix.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .attention import KV, FeedForward, MultiHeadAttention, sinusoidal_table

PAD_ID, UNK_ID, START_ID, END_ID = 0, 1, 2, 3  # fixed by core.vocabulary.Vocabulary


class CaptionDecoderLayer(nn.Module):
    """Post-norm decoder layer (as nn.TransformerDecoderLayer) with an optional outer residual."""

    def __init__(self, d_model: int, heads: int, ffn_dim: int, dropout: float, layer_residual: bool) -> None:
        super().__init__()
        self.self_attn = MultiHeadAttention(d_model, heads, dropout=dropout)
        self.cross_attn = MultiHeadAttention(d_model, heads, dropout=dropout)
        self.ffn = FeedForward(d_model, ffn_dim, dropout)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(d_model), nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.drop = nn.Dropout(dropout)
        self.layer_residual = layer_residual

    def forward(self, x: torch.Tensor, memory_kv: KV, memory_mask: torch.Tensor | None,
                past: KV | None = None) -> tuple[torch.Tensor, KV]:
        """``x`` (B, t, D) new positions; ``past`` the cached self-attention K/V of earlier positions.
        Returns the layer output and the K/V of all positions so far (the next step's ``past``)."""
        k, v = self.self_attn.project_kv(x)
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        # Without a cache every query needs the causal mask; with one, the single new query sees all.
        h = self.norm1(x + self.drop(self.self_attn.attend(x, (k, v), causal=past is None and x.shape[1] > 1)))
        h = self.norm2(h + self.drop(self.cross_attn.attend(h, memory_kv, memory_mask)))
        h = self.norm3(h + self.drop(self.ffn(h)))
        return (h + x if self.layer_residual else h), (k, v)


@dataclass
class DecodeState:
    """Per-decode cache: memory K/V per layer (fixed) and self-attention K/V per layer (growing)."""

    memory_kv: list[KV]
    memory_mask: torch.Tensor | None
    self_kv: list[KV] | None = None
    position: int = 0

    def select(self, index: torch.Tensor, memory: bool = True) -> None:
        """Keep/reorder batch rows (beam search back-pointers). ``memory=False`` leaves the memory K/V as they are:
        right when every row keeps its sample (a beam step only reorders the beams of each sample, which share one
        memory), and it saves copying the largest tensors of the decode at every step."""
        if memory:
            self.memory_kv = [(k.index_select(0, index), v.index_select(0, index)) for k, v in self.memory_kv]
            if self.memory_mask is not None:
                self.memory_mask = self.memory_mask.index_select(0, index)
        if self.self_kv is not None:
            self.self_kv = [(k.index_select(0, index), v.index_select(0, index)) for k, v in self.self_kv]


class CaptionDecoder(nn.Module):
    """Transformer caption decoder over visual tokens (B, N, d_model).

    Token ids follow :class:`core.vocabulary.Vocabulary` (pad 0, <START> 2, <END> 3). ``max_len`` counts
    every token including <START>/<END> (40 as in LEVIR-CC), so at most ``max_len - 1`` are generated.
    """

    def __init__(self, vocab_size: int, d_model: int = 512, heads: int = 8, layers: int = 1,
                 ffn_dim: int = 2048, dropout: float = 0.1, max_len: int = 40, layer_residual: bool = True,
                 tie_embeddings: bool = False, pad_id: int = PAD_ID, start_id: int = START_ID,
                 end_id: int = END_ID) -> None:
        super().__init__()
        self.vocab_size, self.d_model, self.max_len = vocab_size, d_model, max_len
        self.pad_id, self.start_id, self.end_id = pad_id, start_id, end_id
        self.embed = nn.Embedding(vocab_size, d_model, padding_idx=pad_id)
        self.register_buffer("pos_table", sinusoidal_table(max_len, d_model), persistent=False)
        self.drop = nn.Dropout(dropout)
        self.layers = nn.ModuleList(
            [CaptionDecoderLayer(d_model, heads, ffn_dim, dropout, layer_residual) for _ in range(layers)])
        self.classifier = nn.Linear(d_model, vocab_size)
        if tie_embeddings:
            self.classifier.weight = self.embed.weight
        nn.init.uniform_(self.embed.weight, -0.1, 0.1)
        with torch.no_grad():
            self.embed.weight[pad_id].zero_()

    # ---- shared pieces -------------------------------------------------------------------------
    def _embed(self, tokens: torch.Tensor, start: int) -> torch.Tensor:
        end = start + tokens.shape[1]
        if end > self.max_len:
            raise ValueError(f"caption of {end} tokens exceeds max_len {self.max_len}")
        return self.drop(self.embed(tokens) + self.pos_table[start:end])

    def prepare(self, memory: torch.Tensor, memory_mask: torch.Tensor | None = None) -> DecodeState:
        """Project the visual memory to every layer's cross-attention K/V once."""
        return DecodeState([layer.cross_attn.project_kv(memory) for layer in self.layers], memory_mask)

    # ---- training --------------------------------------------------------------------------------
    def forward(self, tokens: torch.Tensor, memory: torch.Tensor,
                memory_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Teacher forcing: ``tokens`` (B, T) decoder inputs starting with <START> -> logits (B, T, V)
        predicting the next token at every position (targets = the caption shifted left by one).
        Padding after <END> needs no mask: causal attention never lets a real token see it."""
        state = self.prepare(memory, memory_mask)
        x = self._embed(tokens, 0)
        for layer, mkv in zip(self.layers, state.memory_kv):
            x, _ = layer(x, mkv, memory_mask)
        return self.classifier(self.drop(x))

    # ---- inference -------------------------------------------------------------------------------
    def step(self, tokens: torch.Tensor, state: DecodeState) -> torch.Tensor:
        """Feed one token per row (B,) at ``state.position``; returns next-token logits (B, V)."""
        x = self._embed(tokens[:, None], state.position)
        new_kv: list[KV] = []
        for i, (layer, mkv) in enumerate(zip(self.layers, state.memory_kv)):
            past = state.self_kv[i] if state.self_kv is not None else None
            x, kv = layer(x, mkv, state.memory_mask, past)
            new_kv.append(kv)
        state.self_kv, state.position = new_kv, state.position + 1
        return self.classifier(x[:, 0])

    def next_logits(self, tokens: torch.Tensor, state: DecodeState) -> torch.Tensor:
        """:meth:`step` with <NULL> and <START> made impossible (a caption never contains them)."""
        logits = self.step(tokens, state).float()
        logits[:, [self.pad_id, self.start_id]] = float("-inf")
        return logits

    def _steps(self, max_len: int | None) -> int:
        return min(max_len or self.max_len, self.max_len) - 1

    def greedy(self, memory: torch.Tensor, memory_mask: torch.Tensor | None = None,
               max_len: int | None = None) -> torch.Tensor:
        """Batched greedy decoding -> ids (B, T) after <START>, each row ending in <END> (unless cut at
        ``max_len``) and padded with ``pad_id``; T is the longest row."""
        b = memory.shape[0]
        state = self.prepare(memory, memory_mask)
        tok = torch.full((b,), self.start_id, dtype=torch.long, device=memory.device)
        done = torch.zeros(b, dtype=torch.bool, device=memory.device)
        out: list[torch.Tensor] = []
        for _ in range(self._steps(max_len)):
            tok = self.next_logits(tok, state).argmax(-1)
            tok = tok.masked_fill(done, self.pad_id)
            out.append(tok)
            done |= tok == self.end_id
            if bool(done.all()):
                break
        return torch.stack(out, 1) if out else torch.empty(b, 0, dtype=torch.long, device=memory.device)

    def beam_search(self, memory: torch.Tensor, memory_mask: torch.Tensor | None = None, beam_size: int = 3,
                    max_len: int | None = None, length_penalty: float = 0.0) -> torch.Tensor:
        """Batched beam search -> best ids per sample (B, T), same layout as :meth:`greedy`.

        Beams that emit <END> are frozen (they may only continue with pad at zero cost) and keep competing
        on their summed log-probability; the final choice divides by ``length ** length_penalty``
        (0 = plain sum, as in the LEVIR-CC evaluation code). Stops when every beam has finished.
        """
        if beam_size < 1:
            raise ValueError("beam_size must be >= 1")
        b, k, dev = memory.shape[0], beam_size, memory.device
        state = self.prepare(memory, memory_mask)
        state.select(torch.arange(b, device=dev).repeat_interleave(k))  # (B*k) rows, memory K/V shared
        scores = torch.full((b, k), float("-inf"), device=dev)
        scores[:, 0] = 0.0  # all beams start identical: keep one so the first step yields k distinct words
        tok = torch.full((b * k,), self.start_id, dtype=torch.long, device=dev)
        done = torch.zeros(b * k, dtype=torch.bool, device=dev)
        seqs = torch.empty(b * k, 0, dtype=torch.long, device=dev)
        base = (torch.arange(b, device=dev) * k)[:, None]
        for _ in range(self._steps(max_len)):
            logp = F.log_softmax(self.next_logits(tok, state), dim=-1)
            v = logp.shape[-1]
            frozen = torch.full_like(logp, float("-inf"))
            frozen[:, self.pad_id] = 0.0
            logp = torch.where(done[:, None], frozen, logp)
            cand = (scores.reshape(-1, 1) + logp).view(b, k * v)
            scores, flat = cand.topk(k, dim=1)
            rows = (base + torch.div(flat, v, rounding_mode="floor")).reshape(-1)
            tok = (flat % v).reshape(-1)
            seqs = torch.cat([seqs.index_select(0, rows), tok[:, None]], 1)
            done = done.index_select(0, rows) | (tok == self.end_id)
            state.select(rows, memory=False)  # rows stay within their sample: same memory
            if bool(done.all()):
                break
        final = scores
        if length_penalty:
            lengths = (seqs != self.pad_id).sum(1).clamp(min=1).view(b, k).float()
            final = scores / lengths.pow(length_penalty)
        best = final.argmax(1)
        out = seqs.view(b, k, -1)[torch.arange(b, device=dev), best]
        width = int((out != self.pad_id).sum(1).max()) if out.numel() else 0
        return out[:, :width]

    @torch.no_grad()
    def generate(self, memory: torch.Tensor, memory_mask: torch.Tensor | None = None, beam_size: int = 1,
                 max_len: int | None = None, length_penalty: float = 0.0) -> torch.Tensor:
        """Greedy for ``beam_size == 1``, beam search otherwise; on the CPU with one intra-op thread
        (:func:`one_cpu_thread`)."""
        with one_cpu_thread(memory.device):
            if beam_size == 1:
                return self.greedy(memory, memory_mask, max_len)
            return self.beam_search(memory, memory_mask, beam_size, max_len, length_penalty)


@contextmanager
def one_cpu_thread(device: torch.device) -> Iterator[None]:
    """Run the block with one torch intra-op thread on the CPU. Decoding is hundreds of tiny operations (one token
    of a few captions each): more threads only add a barrier wait to each of them. Measured with the default model
    on 2 cores, greedy decoding of 8 pairs took 20 ms of CPU time on one thread and 74-1,050 ms on two (the more
    other jobs share the CPU, the worse)."""
    if device.type != "cpu" or torch.get_num_threads() == 1:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
