"""Published state dicts -> ChangeScribe modules: the key and tensor layout of each family's own code.

A converter reads the architecture's size from the checkpoint's shapes (so every variant a code base trains
imports), builds the registered architecture with the options that make it compute what the original computes,
renames every tensor, and then checks the fit: a tensor the checkpoint lacks, one it has that nothing uses, or a
shape that differs is named in one message, never loaded partly. Which keys exist and what they hold was read from
each family's public code (the commit is in :mod:`..published`); ``tests/data/published/*.json`` records them.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from ..checkpoints import CheckpointError
from ..vocabulary import SPECIALS, Vocabulary
from .bit_cd import BIT_ORIGINAL, BitCD, BitCDConfig
from .change_agent import ChangeAgentMCI, ChangeAgentMCIConfig
from .mix_transformer import MIT_VARIANTS
from .rsiccformer import RSICCformer, RSICCformerConfig

# Where a training checkpoint keeps the weights (BIT_CD's trainer saves {'model_G_state_dict': ..., optimiser, ...}).
STATE_KEYS = ("model_G_state_dict", "state_dict", "model")
# Checkpoints that keep each part's weights under its own key: their tensors are named PART.key, PART being the name
# the peer's scripts give that module. RSICC's trainer saves its three modules (read here as their state dicts);
# Change-Agent's saves {'encoder_dict', 'encoder_trans_dict', 'decoder_dict'} (its predict.py's encoder, encoder_trans
# and decoder).
PART_LAYOUTS: tuple[dict[str, str], ...] = (
    {"encoder_image": "encoder_image", "encoder_feat": "encoder_feat", "decoder": "decoder"},
    {"encoder_dict": "encoder", "encoder_trans_dict": "encoder_trans", "decoder_dict": "decoder"},
)


def checkpoint_state(raw: Any, source: str) -> dict[str, torch.Tensor]:
    """The state dict inside a loaded checkpoint: a training checkpoint's weights entry, its parts' weights
    (:data:`PART_LAYOUTS`), or the dict itself; ``module.`` (DataParallel) prefixes removed."""
    state = raw
    layout = next((parts for parts in PART_LAYOUTS if isinstance(raw, Mapping)
                   and all(isinstance(raw.get(k), Mapping) for k in parts)), None)
    if layout is not None:
        state = {f"{name}.{str(k).removeprefix('module.')}": v for key, name in layout.items()
                 for k, v in raw[key].items()}
    elif isinstance(raw, Mapping):
        for key in STATE_KEYS:
            if isinstance(raw.get(key), Mapping):
                state = raw[key]
                break
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{source} holds a {type(raw).__name__}, not a state dict of tensors")
    tensors = {str(k).removeprefix("module."): v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"{source} holds no tensors (keys: {', '.join(map(str, list(state)[:6]))})")
    return tensors


def _shape(t: torch.Tensor | tuple) -> str:
    return "x".join(map(str, tuple(t.shape) if isinstance(t, torch.Tensor) else t)) or "scalar"


def _names(items: list[str], limit: int = 4) -> str:
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


class StateMapping:
    """Converted tensors, with the checkpoint key each came from, and the checkpoint keys that were used."""

    def __init__(self, state: dict[str, torch.Tensor]) -> None:
        self.state = state
        self.out: dict[str, torch.Tensor] = {}
        self.origin: dict[str, str] = {}
        self.used: set[str] = set()

    def put(self, target: str, tensor: torch.Tensor, origin: str) -> None:
        self.out[target] = tensor
        self.origin[target] = origin
        self.used.add(origin)

    def rename(self, rules: list[tuple[str, str]]) -> None:
        """Every checkpoint key matching a rule's pattern (a full-match regex) goes to its replacement."""
        compiled = [(re.compile(p), r) for p, r in rules]
        for key, tensor in self.state.items():
            for pattern, repl in compiled:
                if pattern.fullmatch(key):
                    self.put(pattern.sub(repl, key), tensor, key)
                    break

    def ignore(self, patterns: list[str]) -> None:
        """Checkpoint keys the original builds but never uses in its forward pass (e.g. ResNet's unused layer4)."""
        compiled = [re.compile(p) for p in patterns]
        self.used.update(k for k in self.state if any(p.fullmatch(k) for p in compiled))

    def load_into(self, module: nn.Module, family: str, source: str) -> None:
        """Load strictly, or raise one line naming the layers that did not fit."""
        target = module.state_dict()
        missing = [k for k in target if k not in self.out]
        shapes = [f"{self.origin[k]} {_shape(self.out[k])} (needs {_shape(target[k])})"
                  for k in target if k in self.out and self.out[k].shape != target[k].shape]
        unknown = sorted(set(self.state) - self.used)
        if missing or shapes or unknown:
            parts = []
            if shapes:
                parts.append(f"wrong shape: {_names(shapes)}")
            if missing:
                parts.append(f"missing: {_names(missing)}")
            if unknown:
                parts.append(f"not in the {family} layout: {_names(unknown)}")
            n = len(missing) + len(shapes) + len(unknown)
            raise CheckpointError(f"{source} does not fit the {family!r} family: {n} layer(s) did not fit; "
                                  + "; ".join(parts))
        module.load_state_dict({k: v.to(target[k].dtype) for k, v in self.out.items()}, strict=True)


def _need(state: dict[str, torch.Tensor], key: str, family: str, source: str) -> torch.Tensor:
    if key not in state:
        raise CheckpointError(f"{source} does not fit the {family!r} family: it has no {key!r} "
                              f"(its keys start {_names(sorted(state), 3)})")
    return state[key]


def _count(state: dict[str, torch.Tensor], pattern: str) -> int:
    rx = re.compile(pattern)
    return len({m.group(1) for k in state if (m := rx.fullmatch(k))})


# BIT_CD's names (models/networks.py BASE_Transformer, models/help_funcs.py): resnet.* (a torchvision ResNet-18),
# conv_pred (3x3 to 32 channels), conv_a (tokenizer), pos_embedding, transformer.layers.i.{0: Residual(PreNorm(
# Attention with one fused to_qkv)), 1: Residual(PreNorm(FeedForward))}, transformer_decoder.layers.i.{0:
# Residual2(PreNorm2(Cross_Attention: one LayerNorm for query and memory, separate to_q/to_k/to_v)), 1: ...},
# classifier (TwoLayerConv2d: conv, BN, ReLU, conv).
_BIT_RULES = [
    (r"resnet\.(conv1|bn1)\.(.+)", r"backbone.\1.\2"),
    (r"resnet\.layer1\.(.+)", r"backbone.layers.0.\1"),
    (r"resnet\.layer2\.(.+)", r"backbone.layers.1.\1"),
    (r"resnet\.layer3\.(.+)", r"backbone.layers.2.\1"),
    (r"resnet\.layer4\.(.+)", r"backbone.layers.3.\1"),
    (r"conv_pred\.(weight|bias)", r"reduce.\1"),
    (r"conv_a\.weight", r"tokenizer.weight"),
    (r"pos_embedding", r"pos"),
    (r"classifier\.(\d+)\.(.+)", r"head.\1.\2"),
    (r"transformer\.layers\.(\d+)\.0\.fn\.norm\.(weight|bias)", r"encoder.\1.norm_q.\2"),
    (r"transformer\.layers\.(\d+)\.0\.fn\.fn\.to_out\.0\.(weight|bias)", r"encoder.\1.attn.to_out.\2"),
    (r"transformer\.layers\.(\d+)\.1\.fn\.norm\.(weight|bias)", r"encoder.\1.norm_ff.\2"),
    (r"transformer\.layers\.(\d+)\.1\.fn\.fn\.net\.(0|3)\.(weight|bias)", r"encoder.\1.ff.net.\2.\3"),
    (r"transformer_decoder\.layers\.(\d+)\.0\.fn\.fn\.(to_q|to_k|to_v)\.weight", r"decoder.\1.attn.\2.weight"),
    (r"transformer_decoder\.layers\.(\d+)\.0\.fn\.fn\.to_out\.0\.(weight|bias)", r"decoder.\1.attn.to_out.\2"),
    (r"transformer_decoder\.layers\.(\d+)\.1\.fn\.norm\.(weight|bias)", r"decoder.\1.norm_ff.\2"),
    (r"transformer_decoder\.layers\.(\d+)\.1\.fn\.fn\.net\.(0|3)\.(weight|bias)", r"decoder.\1.ff.net.\2.\3"),
]
_BIT_HEADS = 8  # fixed in BIT_CD's BASE_Transformer
_BIT_STAGES = {128: 2, 256: 3, 512: 4}  # conv_pred's input width -> ResNet stages kept (its resnet_stages_num - 1)


def bit_config(state: dict[str, torch.Tensor], source: str) -> BitCDConfig:
    """The BIT_CD variant a state dict holds (base_transformer_pos_s4[_dd8[_dedim8]] and the like), from shapes."""
    need = lambda key: _need(state, key, "bit", source)  # noqa: E731
    reduce_w = need("conv_pred.weight")
    stages = _BIT_STAGES.get(int(reduce_w.shape[1]))
    if stages is None:
        raise CheckpointError(f"{source}: conv_pred takes {reduce_w.shape[1]} channels, which no ResNet-18 stage has")
    feature_dim = int(reduce_w.shape[0])
    enc_depth = _count(state, r"transformer\.layers\.(\d+)\.0\.fn\.fn\.to_qkv\.weight")
    dec_depth = _count(state, r"transformer_decoder\.layers\.(\d+)\.0\.fn\.fn\.to_q\.weight")
    if not enc_depth or not dec_depth:
        raise CheckpointError(f"{source} does not fit the 'bit' family: it has no transformer "
                              f"{'encoder' if not enc_depth else 'decoder'} (BIT_CD's base_resnet18 is not a BIT "
                              "model)")
    enc_inner = int(need("transformer.layers.0.0.fn.fn.to_qkv.weight").shape[0]) // 3
    dec_inner = int(need("transformer_decoder.layers.0.0.fn.fn.to_q.weight").shape[0])
    mlp = int(need("transformer.layers.0.1.fn.fn.net.0.weight").shape[0])
    return BitCDConfig(backbone="resnet18", backbone_stages=stages, output_stride=8, feature_dim=feature_dim,
                       token_len=int(need("conv_a.weight").shape[0]), enc_depth=enc_depth, dec_depth=dec_depth,
                       heads=_BIT_HEADS, dim_head=max(1, enc_inner // _BIT_HEADS), mlp_ratio=max(1, mlp // feature_dim),
                       num_classes=int(need("classifier.3.weight").shape[0]),
                       dec_dim_head=max(1, dec_inner // _BIT_HEADS), **BIT_ORIGINAL)


def convert_bit(state: dict[str, torch.Tensor], source: str) -> tuple[nn.Module, BitCDConfig]:
    """BIT_CD's ``BASE_Transformer`` state dict -> ``bit-cd`` with BIT's own layer options."""
    cfg = bit_config(state, source)
    module = BitCD(cfg)
    m = StateMapping(state)
    m.rename(_BIT_RULES)
    for i in range(cfg.enc_depth):  # the fused q/k/v projection, split in its own order
        key = f"transformer.layers.{i}.0.fn.fn.to_qkv.weight"
        if key in state:
            for name, part in zip(("to_q", "to_k", "to_v"), state[key].chunk(3, dim=0)):
                m.put(f"encoder.{i}.attn.{name}.weight", part, key)
    for i in range(cfg.dec_depth):  # PreNorm2 normalises query and memory with one LayerNorm
        for p in ("weight", "bias"):
            key = f"transformer_decoder.layers.{i}.0.fn.norm.{p}"
            if key in state:
                m.put(f"decoder.{i}.norm_q.{p}", state[key], key)
                m.put(f"decoder.{i}.norm_ctx.{p}", state[key].clone(), key)
    # BIT_CD builds a whole ResNet-18 but runs it only up to its stage count: the rest is never used
    kept = cfg.backbone_stages
    m.ignore([r"resnet\.fc\.(weight|bias)"] + [rf"resnet\.layer{n}\..+" for n in range(kept + 1, 5)])
    for n in range(kept + 1, 5):
        for k in [k for k in m.out if k.startswith(f"backbone.layers.{n - 1}.")]:
            del m.out[k]
    m.load_into(module, "bit", source)
    return module, cfg


# RSICC's names (models.py CNN_Encoder, models_RSICCformerDfusion.py MCCFormers_diff_as_Q and DecoderTransformer):
# encoder_image.net = Sequential(conv1, bn1, relu, maxpool, layer1..3) of a torchvision ResNet; encoder_feat.
# {projection, w_embedding, h_embedding, transformer.i (CrossTransformer: one nn.MultiheadAttention, norm1, norm2,
# linear1, linear2), resblock.i.left (conv/BN x 3), LN.i}; decoder.{vocab_embedding, transformer.layers.i (post-norm
# layer: self_attn, multihead_attn2 for the memory, linear1/2, norm1..3), wdc}.
_RSICC_MHA = [  # nn.MultiheadAttention's fused in_proj is split below; its out_proj is a plain Linear
    (r"encoder_feat\.transformer\.(\d+)\.attention\.out_proj\.(weight|bias)", r"cross.\1.attn.to_out.\2"),
    (r"decoder\.transformer\.layers\.(\d+)\.self_attn\.out_proj\.(weight|bias)", r"decoder.layers.\1.self_attn.to_out.\2"),
    (r"decoder\.transformer\.layers\.(\d+)\.multihead_attn2\.out_proj\.(weight|bias)",
     r"decoder.layers.\1.cross_attn.to_out.\2"),
]
_RSICC_RULES = [
    (r"encoder_image\.net\.0\.(.+)", r"extractor.conv1.\1"),
    (r"encoder_image\.net\.1\.(.+)", r"extractor.bn1.\1"),
    (r"encoder_image\.net\.4\.(.+)", r"extractor.layers.0.\1"),
    (r"encoder_image\.net\.5\.(.+)", r"extractor.layers.1.\1"),
    (r"encoder_image\.net\.6\.(.+)", r"extractor.layers.2.\1"),
    (r"encoder_feat\.projection\.(weight|bias)", r"proj.\1"),
    (r"encoder_feat\.w_embedding\.weight", r"col_embed.weight"),
    (r"encoder_feat\.h_embedding\.weight", r"row_embed.weight"),
    (r"encoder_feat\.transformer\.(\d+)\.(norm1|norm2)\.(weight|bias)", r"cross.\1.\2.\3"),
    (r"encoder_feat\.transformer\.(\d+)\.linear1\.(weight|bias)", r"cross.\1.ffn.net.0.\2"),
    (r"encoder_feat\.transformer\.(\d+)\.linear2\.(weight|bias)", r"cross.\1.ffn.net.3.\2"),
    (r"encoder_feat\.resblock\.(\d+)\.left\.(\d+)\.(.+)", r"fuse.\1.body.\2.\3"),
    (r"encoder_feat\.LN\.(\d+)\.(weight|bias)", r"fuse_norm.\1.\2"),
    (r"decoder\.transformer\.layers\.(\d+)\.(norm1|norm2|norm3)\.(weight|bias)", r"decoder.layers.\1.\2.\3"),
    (r"decoder\.transformer\.layers\.(\d+)\.linear1\.(weight|bias)", r"decoder.layers.\1.ffn.net.0.\2"),
    (r"decoder\.transformer\.layers\.(\d+)\.linear2\.(weight|bias)", r"decoder.layers.\1.ffn.net.3.\2"),
    *_RSICC_MHA,
]
_RSICC_IN_PROJ = {  # checkpoint prefix pattern -> our attention module
    r"encoder_feat\.transformer\.(\d+)\.attention": "cross.{}.attn",
    r"decoder\.transformer\.layers\.(\d+)\.self_attn": "decoder.layers.{}.self_attn",
    r"decoder\.transformer\.layers\.(\d+)\.multihead_attn2": "decoder.layers.{}.cross_attn",
}
# Built by RSICC but never used in its forward pass: other backbones' projections, a 1-D position table, the
# decoder layer's unused attentions and gates, and the fixed sinusoidal table (recomputed here, identical).
_RSICC_UNUSED = [
    r"encoder_feat\.projection[234]\.(weight|bias)", r"encoder_feat\.embedding_1D\.weight",
    r"decoder\.transformer\.layers\.\d+\.(self_attn2|multihead_attn|multihead_attn3)\..+",
    r"decoder\.transformer\.layers\.\d+\.fc_alpha[123]\.(weight|bias)",
    r"decoder\.position_encoding\.(pe|embedding_1D\.weight)",
]
_RSICC_SPECIALS = ("<pad>", "<unk>", "<start>", "<end>")  # RSICC's word map names of our SPECIALS, in their order
_RSICC_HEADS = 8  # train.py's --n_heads default; nn.MultiheadAttention keeps no head count in its weights
_RESNET_LAYER3_BLOCKS = {6: "resnet50", 23: "resnet101", 36: "resnet152"}


def word_map_vocabulary(word_map: Mapping[str, int], source: str, specials: tuple[str, ...] = _RSICC_SPECIALS,
                        max_length: int = RSICCformerConfig.max_caption_length) -> tuple[Vocabulary, list[int]]:
    """A peer's word map (word -> id; RSICC's ``WORDMAP_*.json``: <pad> 0, the words, <unk>, <start>, <end>) -> our
    :class:`Vocabulary` (specials first) and, for each of its ids, the word map's id (to reorder the rows).
    ``specials`` are the word map's names of our SPECIALS, in their order."""
    missing = [s for s in specials if s not in word_map]
    if missing:
        raise CheckpointError(f"{source}: the word map has no {', '.join(missing)}; it is not this family's word map")
    ids = sorted(i for i in word_map.values() if type(i) is int)
    if ids != list(range(len(word_map))):
        raise CheckpointError(f"{source}: the word map's ids are not 0..{len(ids) - 1}, each once")
    words = sorted((w for w in word_map if w not in specials), key=word_map.__getitem__)
    clash = [w for w in words if w in SPECIALS]
    if clash:
        raise CheckpointError(f"{source}: the word map has words ChangeScribe reserves: {', '.join(clash)}")
    order = [word_map[s] for s in specials] + [word_map[w] for w in words]
    return Vocabulary(words, max_length=max_length), order


def _split_in_proj(m: StateMapping, state: dict[str, torch.Tensor], modules: dict[str, str]) -> None:
    """nn.MultiheadAttention's fused in_proj (q, k, v stacked) of each checkpoint module pattern -> our attention's
    to_q / to_k / to_v (its out_proj is a plain Linear, renamed by rules)."""
    for pattern, target in modules.items():
        rx = re.compile(pattern + r"\.in_proj_(weight|bias)")
        for key in state:
            if mt := rx.fullmatch(key):
                for name, part in zip(("to_q", "to_k", "to_v"), state[key].chunk(3, dim=0)):
                    m.put(f"{target.format(mt.group(1))}.{name}.{mt.group(2)}", part, key)


def _reorder_words(m: StateMapping, state: dict[str, torch.Tensor], word_map: Mapping[str, int], source: str,
                   family: str, specials: tuple[str, ...], rows: dict[str, str]) -> None:
    """Put the word embedding's and classifier's rows (checkpoint key -> our key) in the vocabulary's order."""
    _, order = word_map_vocabulary(word_map, source, specials)
    first = next(iter(rows))
    n = int(_need(state, first, family, source).shape[0])
    if len(order) != n:
        raise CheckpointError(f"{source}: the word map has {len(order)} entries but the decoder predicts {n} "
                              "words: it belongs to another checkpoint")
    index = torch.tensor(order)
    for key, target in rows.items():
        if key in state:
            m.put(target, state[key].index_select(0, index), key)


def rsiccformer_config(state: dict[str, torch.Tensor], source: str) -> RSICCformerConfig:
    """The RSICCformer variant a state dict holds, from its shapes."""
    need = lambda key: _need(state, key, "rsiccformer", source)  # noqa: E731
    blocks = _count(state, r"encoder_image\.net\.6\.(\d+)\.conv1\.weight")
    backbone = _RESNET_LAYER3_BLOCKS.get(blocks)
    if backbone is None:
        raise CheckpointError(f"{source} does not fit the 'rsiccformer' family: its encoder_image is not a "
                              f"ResNet-50/101/152 cut after layer3 ({blocks} blocks in layer3)")
    proj = need("encoder_feat.projection.weight")
    layers = _count(state, r"encoder_feat\.transformer\.(\d+)\.attention\.in_proj_weight")
    dec_layers = _count(state, r"decoder\.transformer\.layers\.(\d+)\.self_attn\.in_proj_weight")
    if not layers or not dec_layers:
        raise CheckpointError(f"{source} does not fit the 'rsiccformer' family: it has no "
                              f"{'dual-branch encoder' if not layers else 'transformer decoder'} layers")
    return RSICCformerConfig(backbone=backbone, grid=int(need("encoder_feat.w_embedding.weight").shape[0]),
                             d_model=int(proj.shape[0]), heads=_RSICC_HEADS, layers=layers,
                             decoder_heads=_RSICC_HEADS, decoder_layers=dec_layers,
                             vocab_size=int(need("decoder.wdc.weight").shape[0]))


def convert_rsiccformer(state: dict[str, torch.Tensor], source: str,
                        word_map: Mapping[str, int] | None = None) -> tuple[nn.Module, RSICCformerConfig]:
    """RSICC's (encoder_image, encoder_feat, decoder) weights -> ``rsiccformer``; the word embedding and classifier
    rows are reordered from the word map's ids to the vocabulary's (:func:`word_map_vocabulary`)."""
    cfg = rsiccformer_config(state, source)
    module = RSICCformer(cfg)
    m = StateMapping(state)
    m.rename(_RSICC_RULES)
    _split_in_proj(m, state, _RSICC_IN_PROJ)
    if word_map is None:
        raise CheckpointError(f"{source}: an RSICCformer checkpoint needs its word map (WORDMAP_*.json) to name its "
                              "words")
    _reorder_words(m, state, word_map, source, "rsiccformer", _RSICC_SPECIALS,
                   {"decoder.wdc.weight": "decoder.classifier.weight", "decoder.wdc.bias": "decoder.classifier.bias",
                    "decoder.vocab_embedding.weight": "decoder.embed.weight"})
    m.ignore(_RSICC_UNUSED)
    m.load_into(module, "rsiccformer", source)
    return module, cfg


# Change-Agent's names (Multi_change/model: segformer.py MixVisionTransformer as Encoder.cnn.segformer;
# model_encoder_att.py AttentiveEncoder; model_decoder.py DecoderTransformer), saved as encoder / encoder_trans /
# decoder. A block (its Transformer): Q_d_conv / K_d_conv (Dynamic_conv: d_conv_3x3, d_conv_1x5, d_conv_5x1, BN,
# conv_1), att (MultiHeadAtt: to_q, to_k, to_v, to_out.0, fuse_conv), feedforward.net.{0,3}, norm1, norm2.
_MCI_BLOCK = [
    (r"Q_d_conv\.", "query_local."), (r"K_d_conv\.", "context_local."), (r"d_conv_3x3\.", "dw3."),
    (r"d_conv_1x5\.", "dw1x5."), (r"d_conv_5x1\.", "dw5x1."), (r"BN\.", "norm."), (r"conv_1\.", "proj."),
    (r"att\.to_out\.0\.", "attn.to_out."), (r"att\.to_([qkv])\.", r"attn.to_\1."), (r"att\.fuse_conv\.", "kv_fuse."),
    (r"feedforward\.", "ffn."),
]
_MCI_BLOCK_KEYS = (r"(?:Q_d_conv|K_d_conv)\.(?:d_conv_3x3|d_conv_1x5|d_conv_5x1|BN|conv_1)\.\w+|att\.to_[qkv]\.\w+|"
                   r"att\.to_out\.0\.\w+|att\.fuse_conv\.[01]\.\w+|feedforward\.net\.[03]\.\w+|norm[12]\.\w+")
_MIT = r"encoder\.cnn\.segformer\."


def _mit_rules(n: int) -> list[tuple[str, str]]:
    """SegFormer's stage ``n`` (1..4) -> our ``backbone`` stage n - 1 (its fused kv is split in the converter)."""
    block, ours = rf"{_MIT}block{n}\.(\d+)\.", rf"backbone.stages.{n - 1}.\1."
    return [(rf"{_MIT}patch_embed{n}\.(proj|norm)\.(weight|bias)", rf"backbone.embeds.{n - 1}.\1.\2"),
            (rf"{_MIT}norm{n}\.(weight|bias)", rf"backbone.norms.{n - 1}.\1"),
            (rf"{block}(norm1|norm2)\.(weight|bias)", rf"{ours}\2.\3"),
            (rf"{block}attn\.q\.(weight|bias)", rf"{ours}attn.attn.to_q.\2"),
            (rf"{block}attn\.proj\.(weight|bias)", rf"{ours}attn.attn.to_out.\2"),
            (rf"{block}attn\.sr\.(weight|bias)", rf"{ours}attn.reduce.\2"),
            (rf"{block}attn\.norm\.(weight|bias)", rf"{ours}attn.reduce_norm.\2"),
            (rf"{block}mlp\.(fc1|fc2)\.(weight|bias)", rf"{ours}mlp.\2.\3"),
            (rf"{block}mlp\.dwconv\.dwconv\.(weight|bias)", rf"{ours}mlp.dwconv.\2")]


_MCI_RULES = [
    *[rule for n in range(1, 5) for rule in _mit_rules(n)],
    (r"encoder_trans\.h_embedding\.weight", "cc_position.cols.weight"),
    (r"encoder_trans\.w_embedding\.weight", "cc_position.rows.weight"),
    (r"encoder_trans\.h_embedding_CD\.weight", "cd_position.cols.weight"),
    (r"encoder_trans\.w_embedding_CD\.weight", "cd_position.rows.weight"),
    (r"encoder_trans\.conv_dif\.(\d+)\.([01])\.(\w+)", r"diff.\1.\2.\3"),
    (r"encoder_trans\.conv_fuse\.(\d+)\.([013])\.(\w+)", r"fuse.\1.\2.\3"),
    (r"encoder_trans\.to_fused\.(\d+)\.([013])\.(\w+)", r"up.\1.\2.\3"),
    (r"encoder_trans\.to_seg\.([01])\.(weight|bias)", r"classify.\1.\2"),
    (r"decoder\.Conv1\.(weight|bias)", "cap_proj.\\1"),
    (r"decoder\.LN\.left\.(\d+)\.(\w+)", r"cap_fuse.body.\1.\2"),
    (r"decoder\.transformer\.layers\.(\d+)\.(norm1|norm2|norm3)\.(weight|bias)", r"decoder.layers.\1.\2.\3"),
    (r"decoder\.transformer\.layers\.(\d+)\.linear1\.(weight|bias)", r"decoder.layers.\1.ffn.net.0.\2"),
    (r"decoder\.transformer\.layers\.(\d+)\.linear2\.(weight|bias)", r"decoder.layers.\1.ffn.net.3.\2"),
    (r"decoder\.transformer\.layers\.(\d+)\.self_attn\.out_proj\.(weight|bias)",
     r"decoder.layers.\1.self_attn.to_out.\2"),
    (r"decoder\.transformer\.layers\.(\d+)\.multihead_attn\.out_proj\.(weight|bias)",
     r"decoder.layers.\1.cross_attn.to_out.\2"),
]
_MCI_NECKS = {"Dynamic_DIF_aware_TR": "cc_neck", "Transformer_aug_CD": "cd_neck"}
_MCI_IN_PROJ = {r"decoder\.transformer\.layers\.(\d+)\.self_attn": "decoder.layers.{}.self_attn",
                r"decoder\.transformer\.layers\.(\d+)\.multihead_attn": "decoder.layers.{}.cross_attn"}
# Built by Change-Agent but never used in its forward pass: per block the unused layer norms, second fusion conv and
# PCM, each caption layer's Linear, the decoder layer's gates and learned 1-D positions, and the fixed sinusoidal
# table (recomputed here, identical).
_MCI_UNUSED = [
    r"encoder_trans\.(Dynamic_DIF_aware_TR|Transformer_aug_CD)\.\d+\.[01]\.att\.(Q_LN|K_LN|V_LN)\.(weight|bias)",
    r"encoder_trans\.(Dynamic_DIF_aware_TR|Transformer_aug_CD)\.\d+\.[01]\.att\.fuse_conv2\.[01]\.\w+",
    r"encoder_trans\.(Dynamic_DIF_aware_TR|Transformer_aug_CD)\.\d+\.[01]\.PCM\.[013]\.\w+",
    r"encoder_trans\.Dynamic_DIF_aware_TR\.\d+\.2\.(weight|bias)",
    r"decoder\.transformer\.layers\.\d+\.fc_alpha[123]\.(weight|bias)",
    r"decoder\.position_encoding\.(pe|embedding_1D\.weight)",
]
MCI_SPECIALS = ("<NULL>", "<UNK>", "<START>", "<END>")  # Change-Agent's vocab.json: our SPECIALS, same names and ids
_MCI_HEADS = 8  # its --n_heads default (blocks and decoder); nothing in the weights records it


def change_agent_mci_config(state: dict[str, torch.Tensor], source: str) -> ChangeAgentMCIConfig:
    """The Change-Agent MCI variant a state dict holds, from its shapes."""
    need = lambda key: _need(state, key, "change-agent-mci", source)  # noqa: E731
    widths = tuple(int(need(f"encoder.cnn.segformer.patch_embed{n}.proj.weight").shape[0]) for n in range(1, 5))
    depths = tuple(_count(state, rf"{_MIT}block{n}\.(\d+)\.norm1\.weight") for n in range(1, 5))
    backbone = next((name for name, (w, _, d) in MIT_VARIANTS.items() if (w, d) == (widths, depths)), None)
    if backbone is None:
        raise CheckpointError(f"{source} does not fit the 'change-agent-mci' family: its encoder is no SegFormer "
                              f"MiT-B0..B5 (stage widths {widths}, depths {depths})")
    pos = need("encoder_trans.h_embedding.weight")
    layers = _count(state, r"encoder_trans\.Dynamic_DIF_aware_TR\.(\d+)\.0\.att\.to_q\.weight")
    cd_layers = _count(state, r"encoder_trans\.Transformer_aug_CD\.(\d+)\.0\.att\.to_q\.weight")
    dec_layers = _count(state, r"decoder\.transformer\.layers\.(\d+)\.self_attn\.in_proj_weight")
    if not layers or not cd_layers or not dec_layers:
        part = "caption branch" if not layers else "change branch" if not cd_layers else "caption decoder"
        raise CheckpointError(f"{source} does not fit the 'change-agent-mci' family: it has no {part} layers")
    return ChangeAgentMCIConfig(
        backbone=backbone, grid=int(pos.shape[0]), heads=_MCI_HEADS, layers=layers, cd_layers=cd_layers,
        num_classes=int(need("encoder_trans.to_seg.1.weight").shape[0]),
        d_model=int(need("decoder.Conv1.weight").shape[0]), decoder_layers=dec_layers,
        vocab_size=int(need("decoder.wdc.weight").shape[0]),
        # its decoding buffer has --max_length positions (the sinusoidal table's rows), each one predicts a word
        max_caption_length=int(need("decoder.position_encoding.pe").shape[0]) + 1)


def convert_change_agent_mci(state: dict[str, torch.Tensor], source: str, word_map: Mapping[str, int] | None = None
                             ) -> tuple[nn.Module, ChangeAgentMCIConfig]:
    """Change-Agent's (encoder, encoder_trans, decoder) weights -> ``change-agent-mci``; fused projections split, the
    word rows put in the vocabulary's order (:func:`word_map_vocabulary`)."""
    cfg = change_agent_mci_config(state, source)
    module = ChangeAgentMCI(cfg)
    m = StateMapping(state)
    m.rename(_MCI_RULES)
    block = re.compile(rf"encoder_trans\.({'|'.join(_MCI_NECKS)})\.(\d+)\.([01])\.({_MCI_BLOCK_KEYS})")
    inner = [(re.compile(p), r) for p, r in _MCI_BLOCK]
    for key in state:
        if mt := block.fullmatch(key):
            rest = mt.group(4)
            for pattern, repl in inner:
                rest = pattern.sub(repl, rest)
            m.put(f"{_MCI_NECKS[mt.group(1)]}.{mt.group(2)}.{mt.group(3)}.{rest}", state[key], key)
    kv = re.compile(rf"{_MIT}block(\d)\.(\d+)\.attn\.kv\.(weight|bias)")
    for key in state:  # SegFormer's fused key/value projection: keys first
        if mt := kv.fullmatch(key):
            target = f"backbone.stages.{int(mt.group(1)) - 1}.{mt.group(2)}.attn.attn"
            for name, part in zip(("to_k", "to_v"), state[key].chunk(2, dim=0)):
                m.put(f"{target}.{name}.{mt.group(3)}", part, key)
    _split_in_proj(m, state, _MCI_IN_PROJ)
    if word_map is None:
        raise CheckpointError(f"{source}: a Change-Agent checkpoint needs its word map (Multi_change/data/LEVIR_MCI/"
                              "vocab.json) to name its words")
    _reorder_words(m, state, word_map, source, "change-agent-mci", MCI_SPECIALS,
                   {"decoder.wdc.weight": "decoder.classifier.weight", "decoder.wdc.bias": "decoder.classifier.bias",
                    "decoder.vocab_embedding.weight": "decoder.embed.weight"})
    m.ignore(_MCI_UNUSED)
    m.load_into(module, "change-agent-mci", source)
    return module, cfg


CONVERTERS: dict[str, Callable[..., tuple[nn.Module, Any]]] = {"bit": convert_bit, "rsiccformer": convert_rsiccformer,
                                                               "change-agent-mci": convert_change_agent_mci}
# The config each family's checkpoint implies, from its shapes alone (bench/models.py times it without weights).
CONFIGS: dict[str, Callable[[dict[str, torch.Tensor], str], Any]] = {"bit": bit_config,
                                                                     "rsiccformer": rsiccformer_config,
                                                                     "change-agent-mci": change_agent_mci_config}
# Families whose checkpoints name their words in a separate word map (passed to their converter): the word map's
# names of our SPECIALS, in their order.
WORD_MAP_SPECIALS: dict[str, tuple[str, ...]] = {"rsiccformer": _RSICC_SPECIALS, "change-agent-mci": MCI_SPECIALS}
WORD_MAP_FAMILIES = frozenset(WORD_MAP_SPECIALS)


def family_vocabulary(family: str, word_map: Mapping[str, int], config: Any, source: str) -> Vocabulary:
    """The vocabulary of an imported captioner: its word map's words, as long as its config decodes."""
    return word_map_vocabulary(word_map, source, WORD_MAP_SPECIALS[family], config.max_caption_length)[0]


def convert(family: str, raw: Any, source: str, word_map: Mapping[str, int] | None = None) -> tuple[nn.Module, Any]:
    """A loaded checkpoint of ``family`` -> (module with its weights, config), or :class:`CheckpointError`."""
    state = checkpoint_state(raw, source)
    extra = {"word_map": word_map} if family in WORD_MAP_FAMILIES else {}
    module, config = CONVERTERS[family](state, source, **extra)
    return module.eval(), config
