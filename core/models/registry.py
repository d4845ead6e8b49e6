"""Registry of model architectures: name -> builder, default config, paper, description.

Model files name their architecture (``"pix4cap-tiny"``) and carry the full config, so loading is
``get_entry(name).builder(config_from_dict(name, card["config"]))``. New models (SEN, DFM, Semantic-CC)
only need a :func:`register` call.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .change_detector import BITChangeDetector, BITConfig
from .pix4cap import Pix4Cap, Pix4CapConfig

Builder = Callable[..., nn.Module]  # builder(config, backbone_weights=None) -> nn.Module


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
                backbone_weights: str | None = None) -> tuple[nn.Module, Any]:
    """Build a registered model -> (module, config actually used).

    ``input_spec.bands`` sets ``in_channels`` and ``len(vocabulary)`` sets ``vocab_size`` so the returned
    config alone rebuilds the module. ``backbone_weights`` is a LOCAL file (never a download) and is not
    stored in the config: the model file carries the trained weights.
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
    return entry.builder(cfg, backbone_weights=backbone_weights), cfg


def count_parameters(name: str, config: Any = None) -> int:
    """Parameter count without allocating weights (built on the meta device)."""
    with torch.device("meta"):
        module, _ = build_model(name, config)
    return sum(p.numel() for p in module.parameters())


def list_models(count: bool = True) -> list[dict[str, Any]]:
    """Facts about each registered model for UIs and the CLI."""
    return [{"name": e.name, "paper": e.paper, "description": e.description, "captions": e.captions,
             "parameters": count_parameters(e.name) if count else None} for e in map(get_entry, known_models())]


BIT_PAPER = "Chen, Qi & Shi, 'Remote sensing image change detection with transformers', IEEE TGRS 2021"
PIX4CAP_PAPER = ("Liu et al., 'Pixel-level change detection pseudo-label learning for remote sensing change "
                 "captioning' (Pix4Cap), IGARSS 2024")

# pix4cap-tiny: CPU-trainable in minutes. ResNet-18 truncated after layer3 (tokens at stride 16, 16x16
# tokens for a 256 px tile), 1x1 BTF convs to slim widths (the UNet head's 3x3 convs give the spatial
# context), d_model 256, one SFA and one decoder layer: about 5.1 M parameters, ~20 MB float32.
PIX4CAP_TINY = Pix4CapConfig(backbone="resnet18", backbone_stages=3, btf_channels=(32, 64, 128), btf_kernel=1,
                             head_channels=16, d_model=256, heads=8, ffn_dim=512, sfa_layers=1, decoder_layers=1,
                             dropout=0.1)

register(ModelEntry("bit-cd", BITChangeDetector, BITConfig(), BIT_PAPER,
                    "BIT change detector (ResNet-18 S4, 4 tokens, encoder 1 / decoder 8): change mask only.", False))
register(ModelEntry("pix4cap", Pix4Cap, Pix4CapConfig(), PIX4CAP_PAPER,
                    "Pix4Cap, paper configuration (ResNet-34 for the paper's 'ResNet32', d_model 512): "
                    "change mask + caption.", True))
register(ModelEntry("pix4cap-tiny", Pix4Cap, PIX4CAP_TINY, PIX4CAP_PAPER,
                    "Pix4Cap, small configuration for CPU training (ResNet-18 to layer3, d_model 256).", True))
