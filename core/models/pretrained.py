"""Upstream pretrained checkpoints, read from LOCAL files and mapped onto the zoo's modules.

* **BLIP-2 / MiniGPT-4 Q-Former -> Semantic-CC** (:func:`load_qformer`). MiniGPT-4 takes its Q-Former, its 32
  query tokens and ``ln_vision`` unchanged from the BLIP-2 checkpoint ``blip2_pretrained_flant5xxl.pth`` (LAVIS
  layout, ``{"model": state_dict}``); Semantic-CC inherits them. Three layouts are read:

  - LAVIS: ``Qformer.bert.encoder.layer.N.attention.self.query.weight``, ``Qformer.bert.embeddings.LayerNorm``,
    ``query_tokens``, ``ln_vision``;
  - Hugging Face ``Blip2Model`` / ``Blip2ForConditionalGeneration``: ``qformer.encoder.layer.N.attention.attention
    .query.weight``, ``qformer.layernorm``, ``query_tokens``, and ``ln_vision`` as ``vision_model.post_layernorm``;
  - a bare Hugging Face ``Blip2QFormerModel`` state dict (no prefix) plus ``query_tokens``.

  BERT's text-only parts, which a query-only Q-Former never runs (word/position embeddings, the text FFN
  ``intermediate``/``output`` of each layer, the LM head), are ignored; MiniGPT-4 deletes them too.
  The Q-Former cross-attends to 1408-wide EVA ViT-g tokens, SAM ViT-L gives 1024: set the Semantic-CC config's
  ``qformer_encoder_width`` to 1408 (the paper configurations do) and a learned ``vision_proj`` maps SAM's
  tokens to that width, so ``ln_vision`` and every cross-attention key/value load unchanged.
* **CLIP vision tower -> DFM's ViT** (:func:`load_clip_vision`). Layouts: OpenAI CLIP / open_clip
  (``visual.transformer.resblocks.N.attn.in_proj_weight``, ``mlp.c_fc``, ``ln_1``, ...; with or without the
  ``visual.`` prefix) and Hugging Face ``CLIPModel`` / ``CLIPVisionModel`` (``vision_model.encoder.layers.N
  .self_attn.q_proj``, ``mlp.fc1``, ``pre_layrnorm``, ...; with or without ``vision_model.``). The fused
  ``in_proj`` is split into q/k/v. CLIP's ``proj`` / ``visual_projection`` and the text tower are ignored.
  OpenAI's ViT-B/32 uses QuickGELU: the config's ``vit_activation`` must say so (``"quick_gelu"``, as the
  registered ``dfm`` does); a Hugging Face ``config.json`` beside the weights is checked against it.

Files: ``.safetensors``, a Hugging Face folder (``*.safetensors`` or ``pytorch_model.bin`` + ``config.json``), or
a torch file read with ``torch.load(weights_only=True)``; a file that needs unpickling is refused.

**When the files are read.** Never while a model is built: constructors only build layers
(:mod:`.network`). A frozen part that a model file leaves out (Semantic-CC's Q-Former with ``freeze_pretrained``,
like ``sam_checkpoint``) is read whenever a model file is loaded (``load_external_weights``) and when training
starts. A part that training changes (DFM's ViT, an unfrozen Q-Former) is only read when a recipe starts training
(``load_pretrained``): the model file carries the trained tensors, so the checkpoint need not exist on the machine
that runs the model.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .backbones import load_state_file

if TYPE_CHECKING:
    from .vit import ClipViT


# ---- reading ------------------------------------------------------------------------------------------------

def _hf_config(path: Path) -> dict[str, Any] | None:
    cfg = (path if path.is_dir() else path.parent) / "config.json"
    if not cfg.is_file():
        return None
    try:
        return json.loads(cfg.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a local checkpoint file or Hugging Face folder (sharded safetensors included)."""
    p = Path(path)
    if p.is_dir():
        files = sorted(p.glob("*.safetensors")) or sorted(p.glob("pytorch_model*.bin"))
        if not files:
            raise ValueError(f"{p}: no *.safetensors or pytorch_model*.bin weights in this folder")
        state: dict[str, torch.Tensor] = {}
        for f in files:
            state.update(load_state_file(f))
        return state
    return load_state_file(p)


def _assign(target: nn.Module, mapped: dict[str, torch.Tensor], path: str | Path, what: str, hint: str) -> None:
    """Copy ``mapped`` into ``target`` after checking that every tensor is there with the right shape."""
    own = target.state_dict()
    missing = [k for k in own if k not in mapped]
    extra = [k for k in mapped if k not in own]
    wrong = [f"{k} {tuple(mapped[k].shape)} vs {tuple(own[k].shape)}" for k in own
             if k in mapped and mapped[k].shape != own[k].shape]
    problems = []
    if wrong:
        problems.append(f"{len(wrong)} tensors have other shapes (checkpoint vs config), e.g. {wrong[:3]}")
    if missing:
        problems.append(f"{len(missing)} tensors are missing, e.g. {missing[:3]}")
    if extra:
        problems.append(f"{len(extra)} tensors have no place in this config, e.g. {extra[:3]}")
    if problems:
        raise ValueError(f"{path}: not a {what} for this configuration: {'; '.join(problems)}. {hint}")
    target.load_state_dict({k: v.to(own[k].dtype) for k, v in mapped.items()}, strict=True)


# ---- BLIP-2 / MiniGPT-4 Q-Former --------------------------------------------------------------------------

_TEXT_ONLY = re.compile(r"^(embeddings\.(word_embeddings|position_embeddings|position_ids)"
                        r"|encoder\.layer\.\d+\.(intermediate|output)\.)")
_QFORMER_PROBE = ("encoder.layer.0.attention.self.query.weight", "encoder.layer.0.attention.attention.query.weight")


def _qformer_prefix(state: dict[str, torch.Tensor]) -> str:
    for key in state:
        for probe in _QFORMER_PROBE:
            if key.endswith(probe):
                return key[: len(key) - len(probe)]
    raise ValueError("no Q-Former tensors (expected e.g. 'Qformer.bert.encoder.layer.0.attention.self.query.weight' "
                     "or 'qformer.encoder.layer.0.attention.attention.query.weight')")


def qformer_tensors(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], torch.Tensor | None,
                                                             dict[str, torch.Tensor]]:
    """Any supported layout -> (Hugging Face ``Blip2QFormerModel`` state dict, query tokens, ln_vision tensors)."""
    prefix = _qformer_prefix(state)
    qformer: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if not key.startswith(prefix):
            continue
        k = key[len(prefix):]
        if _TEXT_ONLY.match(k) or k.startswith("cls."):
            continue
        if k.startswith("embeddings.LayerNorm."):  # BERT's embedding LayerNorm = HF's qformer.layernorm
            k = "layernorm." + k[len("embeddings.LayerNorm."):]
        elif not (k.startswith("encoder.") or k.startswith("layernorm.")):
            continue
        qformer[k.replace(".attention.self.", ".attention.attention.")
                 .replace(".crossattention.self.", ".crossattention.attention.")] = value
    queries = next((v for k, v in state.items() if k == "query_tokens" or k.endswith(".query_tokens")), None)
    ln_vision = {}
    for name in ("weight", "bias"):
        for key in (f"ln_vision.{name}", f"vision_model.post_layernorm.{name}"):
            hits = [v for k, v in state.items() if k == key or k.endswith("." + key)]
            if hits:
                ln_vision[name] = hits[0]
                break
    return qformer, queries, ln_vision


def load_qformer(model: nn.Module, path: str | Path) -> None:
    """Load a BLIP-2 / MiniGPT-4 Q-Former checkpoint into Semantic-CC's ``qformer``, ``query_tokens`` and (when the
    checkpoint has it) ``ln_vision``; shapes must match exactly (see the module docstring)."""
    try:
        qformer, queries, ln_vision = qformer_tensors(read_checkpoint(path))
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    hint = ("BLIP-2/MiniGPT-4 use qformer_hidden 768, qformer_layers 12, qformer_heads 12, qformer_intermediate "
            "3072, qformer_cross_every 2, num_query_tokens 32 and qformer_encoder_width 1408 (EVA ViT-g)")
    _assign(model.qformer, qformer, path, "BLIP-2 Q-Former", hint)
    if queries is None:
        raise ValueError(f"{path}: the checkpoint has no 'query_tokens' (the learned queries are part of the "
                         "Q-Former; a bare Blip2QFormerModel state dict needs them added)")
    if queries.shape != model.query_tokens.shape:
        raise ValueError(f"{path}: query_tokens {tuple(queries.shape)} vs {tuple(model.query_tokens.shape)} in the "
                         f"config. {hint}")
    with torch.no_grad():
        model.query_tokens.copy_(queries.to(model.query_tokens.dtype))
    if ln_vision:
        _assign(model.ln_vision, ln_vision, path, "BLIP-2 ln_vision", hint)


# ---- CLIP vision tower ------------------------------------------------------------------------------------

_OPENAI_BLOCK = {"ln_1": "norm_q", "ln_2": "norm_ff", "attn.out_proj": "attn.to_out", "mlp.c_fc": "ff.net.0",
                 "mlp.c_proj": "ff.net.3"}
_HF_BLOCK = {"layer_norm1": "norm_q", "layer_norm2": "norm_ff", "self_attn.q_proj": "attn.to_q",
             "self_attn.k_proj": "attn.to_k", "self_attn.v_proj": "attn.to_v", "self_attn.out_proj": "attn.to_out",
             "mlp.fc1": "ff.net.0", "mlp.fc2": "ff.net.3"}
_OPENAI_TOP = {"conv1.weight": "conv1.weight", "class_embedding": "class_embedding",
               "positional_embedding": "positional_embedding", "ln_pre.weight": "ln_pre.weight",
               "ln_pre.bias": "ln_pre.bias", "ln_post.weight": "ln_post.weight", "ln_post.bias": "ln_post.bias"}
_HF_TOP = {"embeddings.patch_embedding.weight": "conv1.weight", "embeddings.class_embedding": "class_embedding",
           "embeddings.position_embedding.weight": "positional_embedding", "pre_layrnorm.weight": "ln_pre.weight",
           "pre_layrnorm.bias": "ln_pre.bias", "post_layernorm.weight": "ln_post.weight",
           "post_layernorm.bias": "ln_post.bias"}


def clip_vision_tensors(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], str]:
    """OpenAI/open_clip or Hugging Face CLIP -> :class:`..vit.ClipViT` state dict, and the layout's name."""
    cls_keys = [k for k in state if k.endswith("class_embedding")]
    if not cls_keys:
        raise ValueError("no CLIP vision tower (no 'class_embedding' tensor)")
    base = cls_keys[0][: -len("class_embedding")]
    hf = base.endswith("embeddings.")
    if hf:
        base = base[: -len("embeddings.")]
    top, block_map = (_HF_TOP, _HF_BLOCK) if hf else (_OPENAI_TOP, _OPENAI_BLOCK)
    blocks = re.compile(re.escape(base) + (r"encoder\.layers\.(\d+)\.(.+)$" if hf
                                           else r"transformer\.resblocks\.(\d+)\.(.+)$"))
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if not key.startswith(base):
            continue
        rest = key[len(base):]
        if rest in top:
            out[top[rest]] = value
            continue
        m = blocks.match(key)
        if not m:
            continue  # proj / visual_projection, the text tower, position_ids
        i, name = m.group(1), m.group(2)
        if name in ("attn.in_proj_weight", "attn.in_proj_bias"):  # OpenAI's fused q, k, v
            kind = name.rsplit("_", 1)[1]
            for part, chunk in zip(("to_q", "to_k", "to_v"), value.chunk(3, dim=0)):
                out[f"blocks.{i}.attn.{part}.{kind}"] = chunk
            continue
        module, _, param = name.rpartition(".")
        if module in block_map:
            out[f"blocks.{i}.{block_map[module]}.{param}"] = value
    if "positional_embedding" in out and out["positional_embedding"].dim() == 3:  # some exports keep (1, N, C)
        out["positional_embedding"] = out["positional_embedding"][0]
    return out, "hugging face" if hf else "openai"


def _check_hf_clip_config(path: Path, vit: "ClipViT", activation: str) -> None:
    cfg = _hf_config(path)
    if cfg is None:
        return
    vision = cfg.get("vision_config", cfg)
    act = vision.get("hidden_act")
    if act is not None and act != activation:
        raise ValueError(f"{path}: the checkpoint's MLP activation is {act!r} but the config's vit_activation is "
                         f"{activation!r}; set vit_activation to {act!r}")
    heads = vision.get("num_attention_heads")
    ours = vit.blocks[0].attn.heads if len(vit.blocks) else heads
    if heads is not None and heads != ours:
        raise ValueError(f"{path}: the checkpoint has {heads} attention heads, the config's vit_heads is {ours}")


def load_clip_vision(vit: "ClipViT", path: str | Path, activation: str) -> None:
    """Load a CLIP vision tower into DFM's :class:`..vit.ClipViT` (``activation`` = the config's
    ``vit_activation``, checked against a Hugging Face ``config.json`` when there is one)."""
    p = Path(path)
    try:
        mapped, _ = clip_vision_tensors(read_checkpoint(p))
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    _check_hf_clip_config(p, vit, activation)
    hint = ("Match the config to the checkpoint: vit_width (ViT-B: 768), vit_layers (12), vit_patch (32 for "
            "ViT-B/32), vit_grid (image size / patch: 7 for 224 px) and in_channels 3")
    _assign(vit, mapped, path, "CLIP vision tower", hint)
