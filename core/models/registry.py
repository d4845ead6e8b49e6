"""Registry of model architectures: name -> builder, default config, paper, description.

Model files name their architecture (``"pix4cap-tiny"``) and carry the full config, so loading is
``get_entry(name).builder(config_from_dict(name, card["config"]))``. New models (SEN, DFM, Semantic-CC)
only need a :func:`register` call.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Any

import torch

from .bit_cd import BitCD, BitCDConfig
from .change_agent import ChangeAgentMCI, ChangeAgentMCIConfig
from .dfm import DFM, DFMConfig
from .network import ChangeNetwork
from .pix4cap import Pix4Cap, Pix4CapConfig
from .rsiccformer import RSICCformer, RSICCformerConfig
from .semantic_cc import WEIGHTS_NOTE, SemanticCC, SemanticCCConfig, sam_config
from .sen import SEN, SENConfig

# The architecture's class: builder(config) only builds its layers and reads no file; weights are loaded afterwards,
# by whoever needs them (ChangeNetwork.load_backbone / load_pretrained / load_external_weights).
Builder = type[ChangeNetwork]


class UnknownModelError(ValueError):
    """An architecture name that is not registered."""


@dataclass(frozen=True)
class ModelEntry:
    name: str
    builder: Builder
    config: Any  # default config dataclass instance
    paper: str
    description: str
    captions: bool

    @property
    def detects(self) -> bool:
        """Whether the architecture has a change head (SEN has none: it runs paired with a detector)."""
        return self.builder.can_detect


_REGISTRY: dict[str, ModelEntry] = {}


def register(entry: ModelEntry) -> None:
    _REGISTRY[entry.name] = entry


def known_models() -> list[str]:
    return sorted(_REGISTRY)


def get_entry(name: str) -> ModelEntry:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownModelError(f"unknown model architecture {name!r}; known: {', '.join(known_models())}") from None


def config_from_dict(name: str, d: dict[str, Any]) -> Any:
    """Rebuild a config dataclass from JSON; lists become tuples where the field is a tuple.
    Unknown keys are an error so a card from a newer, incompatible version fails loudly."""
    cls = type(get_entry(name).config)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(d) - set(fields)
    if unknown:
        raise ValueError(f"config keys {sorted(unknown)} are not known to {cls.__name__}")
    hints = typing.get_type_hints(cls)
    kw = {k: (tuple(v) if isinstance(v, list) and "tuple" in str(hints.get(k)) else v) for k, v in d.items()}
    return cls(**kw)


def config_to_dict(config: Any) -> dict[str, Any]:
    return config if isinstance(config, dict) else dataclasses.asdict(config)


def build_model(name: str, config: Any = None, *, input_spec: Any = None, vocabulary: Any = None,
                backbone_weights: str | None = None) -> tuple[ChangeNetwork, Any]:
    """Build a registered model -> (module, config actually used).

    ``input_spec.bands`` sets ``in_channels`` and ``len(vocabulary)`` sets ``vocab_size`` so the returned
    config alone rebuilds the module. ``backbone_weights`` is a LOCAL file (never a download) that the built
    module's :meth:`~.network.ChangeNetwork.load_backbone` reads; it is not stored in the config: the model file
    carries the trained weights. Checkpoints the config names (DFM's
    ``clip_checkpoint``, Semantic-CC's ``sam_checkpoint`` / ``qformer_checkpoint``) are not read here: a recipe
    calls the module's ``load_pretrained()``, model-file loading its ``load_external_weights()``.
    """
    entry = get_entry(name)
    cfg = entry.config if config is None else config
    if isinstance(cfg, dict):
        cfg = config_from_dict(name, cfg)
    changes: dict[str, Any] = {}
    if input_spec is not None and hasattr(cfg, "in_channels"):
        changes["in_channels"] = int(input_spec.bands)
    if vocabulary is not None and hasattr(cfg, "vocab_size"):
        changes["vocab_size"] = len(vocabulary)
    cfg = dataclasses.replace(cfg, **changes)
    module = entry.builder(cfg)
    if backbone_weights is not None:
        module.load_backbone(backbone_weights)
    if vocabulary is not None:  # Semantic-CC's word-level tokenizer
        module.attach_vocabulary(vocabulary)
    return module, cfg


def count_parameters(name: str, config: Any = None) -> int:
    """Parameter count without allocating weights (built on the meta device)."""
    with torch.device("meta"):
        module, _ = build_model(name, config)
    return sum(p.numel() for p in module.parameters())


def _count_or_none(name: str) -> int | None:
    try:
        return count_parameters(name)
    except ImportError:  # an optional dependency (transformers/peft for Semantic-CC) is not installed
        return None


def list_models(count: bool = True) -> list[dict[str, Any]]:
    """Facts about each registered model for UIs and the CLI (``parameters`` None when uncountable here)."""
    return [{"name": e.name, "paper": e.paper, "description": e.description, "captions": e.captions,
             "parameters": _count_or_none(e.name) if count else None} for e in map(get_entry, known_models())]


BIT_PAPER = "Chen, Qi & Shi, 'Remote sensing image change detection with transformers', IEEE TGRS 2021"
PIX4CAP_PAPER = ("Liu et al., 'Pixel-level change detection pseudo-label learning for remote sensing change "
                 "captioning' (Pix4Cap), IGARSS 2024")

# pix4cap-tiny: CPU-trainable in minutes. ResNet-18 truncated after layer3 (tokens at stride 16, 16x16
# tokens for a 256 px tile), 1x1 BTF convs to slim widths (the UNet head's 3x3 convs give the spatial
# context), d_model 256, one SFA and one decoder layer: about 5.1 M parameters, ~20 MB float32.
PIX4CAP_TINY = Pix4CapConfig(backbone="resnet18", backbone_stages=3, btf_channels=(32, 64, 128), btf_kernel=1,
                             head_channels=16, d_model=256, heads=8, ffn_dim=512, sfa_layers=1, decoder_layers=1,
                             dropout=0.1)

# pix4cap-lite: the default model's architecture. ImageNet EfficientNet-Lite0 to stride 16 (TinyCD's lesson:
# pretrained low-level features do most of the work), its stem and first 8 blocks kept frozen, 3x3 BTF, the
# tiny caption branch: about 2.9 M parameters, 0.3 GFLOPs per 256 px pair.
PIX4CAP_LITE = Pix4CapConfig(backbone="efficientnet-lite0", backbone_stages=3, backbone_frozen=8,
                             btf_channels=(24, 48, 96), btf_kernel=3, head_channels=16, d_model=256, heads=8,
                             ffn_dim=512, sfa_layers=1, decoder_layers=1, dropout=0.1)

register(ModelEntry("bit-cd", BitCD, BitCDConfig(), BIT_PAPER,
                    "BIT change detector (ResNet-18 S4, 4 tokens, encoder 1 / decoder 8): change mask only.", False))
register(ModelEntry("pix4cap", Pix4Cap, Pix4CapConfig(), PIX4CAP_PAPER,
                    "Pix4Cap, paper configuration (ResNet-34 for the paper's 'ResNet32', d_model 512): "
                    "change mask + caption.", True))
register(ModelEntry("pix4cap-tiny", Pix4Cap, PIX4CAP_TINY, PIX4CAP_PAPER,
                    "Pix4Cap, small configuration for CPU training (ResNet-18 to layer3, d_model 256).", True))
register(ModelEntry("pix4cap-lite", Pix4Cap, PIX4CAP_LITE, PIX4CAP_PAPER,
                    "Pix4Cap on an ImageNet EfficientNet-Lite0 (to stride 16, partly frozen), d_model 256: change "
                    "mask + caption; the default model's architecture.", True))

SEN_PAPER = ("Zhou, Gao, Yuan & Wang, 'Single-stream Extractor Network with Contrastive Pre-training for Remote "
             "Sensing Change Captioning' (SEN), IEEE TGRS 2024")
DFM_PAPER = ("'DFM: Difference Feature Modeling with Text-Guided Gated Contrastive Loss for Remote Sensing Image "
             "Change Captioning'")
SEMANTIC_CC_PAPER = ("Zhu, Li, Chen, Liu, Zhou & Shi, 'Semantic-CC: Boosting Remote Sensing Image Change Captioning "
                     "via Foundational Knowledge and Semantic Guidance'")

# sen-small: ResNet-18 single-stream extractor, D = 256, otherwise the paper's layout (N_e 2, N_d 1, beam 3).
SEN_SMALL = SENConfig(backbone="resnet18", d_model=256, ffn_dim=1024, ca_reduction=16)
# dfm-small: a 6-layer 256-wide ViT/32, one spatio-temporal layer, the paper-size BIT (3.5 M) as CD encoder.
DFM_SMALL = DFMConfig(vit_width=256, vit_layers=6, vit_heads=4, vit_grid=8, d_model=256, heads=8, ffn_dim=1024,
                      st_layers=1, cd_grid=16)
# semantic-cc-small: everything trained from scratch on a laptop (nothing pretrained to keep frozen, so no
# LoRA and no freezing): a 256-px SAM-style ViT (256 wide, 6 blocks, global attention at 2 and 5), a
# 2-layer Q-Former with 16 queries and a 4-layer 256-wide Llama-style decoder over the word vocabulary.
SEMANTIC_CC_SMALL = SemanticCCConfig(
    embed_dim=256, depth=6, vit_heads=8, global_attn_indexes=(2, 5), window=8, img_size=256, neck_channels=128,
    lora_r=0, bcsf_ffn_ratio=1.0, neck_units=3, neck_mlp_ratio=2, fpn_channels=128, cd_channels=64,
    num_query_tokens=16, qformer_hidden=256, qformer_layers=2, qformer_heads=4, qformer_intermediate=512,
    llm_hidden=256, llm_layers=4, llm_heads=4, llm_intermediate=688, llm_max_positions=256, vocab_size=436,
    llm_lora_r=0, freeze_pretrained=False)

RSICCFORMER_PAPER = ("Liu, Zhao, Chen, Zou & Shi, 'Remote Sensing Image Change Captioning With Dual-Branch "
                     "Transformers: A New Method and a Large Scale Dataset', IEEE TGRS 2022")
register(ModelEntry("rsiccformer", RSICCformer, RSICCformerConfig(), RSICCFORMER_PAPER,
                    "RSICCformer (Chen-Yang-Liu/RSICC): ResNet-101-3, 3 dual-branch cross layers, 1024-wide decoder; "
                    "imports its published LEVIR-CC checkpoints. Caption only - paired with a change detector.",
                    True))
CHANGE_AGENT_PAPER = ("Liu, Chen, Zhang, Qi, Zou & Shi, 'Change-Agent: Toward Interactive Comprehensive Remote "
                      "Sensing Change Interpretation and Analysis', IEEE TGRS 2024")
register(ModelEntry("change-agent-mci", ChangeAgentMCI, ChangeAgentMCIConfig(), CHANGE_AGENT_PAPER,
                    "Change-Agent's MCI model (Chen-Yang-Liu/Change-Agent): MiT-B1, difference-aware change and caption "
                    "branches: change mask (road / building as change) + caption from one encoder pass; imports its "
                    "published LEVIR-MCI checkpoint.", True))
register(ModelEntry("sen", SEN, SENConfig(), SEN_PAPER,
                    "SEN, paper configuration (6-band single-stream ResNet-50, D 512, SFE, CAGD N_e 2, decoder N_d 1, "
                    "beam 3): caption only - paired with a change detector.", True))
register(ModelEntry("sen-small", SEN, SEN_SMALL, SEN_PAPER,
                    "SEN, small configuration (6-band ResNet-18, D 256): caption only - paired with a change "
                    "detector.", True))
# The paper configuration's ViT is CLIP ViT-B/32 (QuickGELU), so OpenAI CLIP weights load via clip_checkpoint.
register(ModelEntry("dfm", DFM, DFMConfig(vit_activation="quick_gelu"), DFM_PAPER,
                    "DFM, paper configuration (CLIP-layout ViT-B/32, BIT change encoder injected by cross-attention, "
                    "Joint Feature Modeling, TGCL heads): change mask (BIT) + caption.", True))
register(ModelEntry("dfm-small", DFM, DFM_SMALL, DFM_PAPER,
                    "DFM, small configuration (6-layer 256-wide ViT/32, BIT change encoder): change mask + caption.",
                    True))
# The paper inherits MiniGPT-4's Q-Former: its 1408-wide (EVA ViT-g) cross-attention input is kept and SAM's
# tokens are mapped to it (semantic_cc.py's docstring), so a BLIP-2 checkpoint loads through qformer_checkpoint.
MINIGPT4_QFORMER = {"qformer_encoder_width": 1408}
register(ModelEntry("semantic-cc-vit-l", SemanticCC, sam_config("vit_l", **MINIGPT4_QFORMER), SEMANTIC_CC_PAPER,
                    "Semantic-CC, paper configuration (SAM ViT-L + LoRA + BCSF, 3-unit aggregation neck, SimpleFPN "
                    "CD decoder, Q-Former + enhancer + Vicuna-7B-size LLM with LoRA): change mask + caption. "
                    + WEIGHTS_NOTE, True))
register(ModelEntry("semantic-cc-vit-b", SemanticCC, sam_config("vit_b", **MINIGPT4_QFORMER), SEMANTIC_CC_PAPER,
                    "Semantic-CC on SAM ViT-B (otherwise the paper configuration): change mask + caption. "
                    + WEIGHTS_NOTE, True))
register(ModelEntry("semantic-cc-small", SemanticCC, SEMANTIC_CC_SMALL, SEMANTIC_CC_PAPER,
                    "Semantic-CC, small configuration trained from scratch (256-wide SAM-style ViT, 4-layer "
                    "Llama-style decoder over the word vocabulary): change mask + caption.", True))
