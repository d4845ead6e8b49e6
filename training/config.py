"""Recipe configuration: one JSON file per run, read into plain dataclasses (one place for every knob)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path


@dataclass
class DataConfig:
    source: str = "synthetic"          # synthetic | levircc | levircd (readers: training issue)
    root: str | None = None            # dataset root for real layouts
    train_pairs: int = 2000            # synthetic only
    val_pairs: int = 200
    size: int = 256
    p_no_change: float = 0.3
    first_seed: int = 0


@dataclass
class VocabularyConfig:
    source: str = "levircc"            # levircc: the LEVIR-CC train captions; data: the training captions
    path: str | None = None            # levircc_captions.json
    min_count: int = 5
    max_length: int = 40


@dataclass
class OptimConfig:
    lr: float = 1e-4                   # Adam (Pix4Cap); RSICCformer lineage uses 1e-4
    weight_decay: float = 0.0
    batch_size: int = 32
    epochs: int = 40
    max_steps: int | None = None       # stop early (CPU smoke runs)
    grad_clip: float | None = 5.0
    num_workers: int = 0


@dataclass
class TrainConfig:
    recipe: str = "pix4cap"
    architecture: str = "pix4cap-tiny"
    model_name: str = "pix4cap-custom"
    model_version: str = "0.1.0"
    config_overrides: dict = field(default_factory=dict)
    tile_size: int = 256
    gsd: float | None = 0.5
    seed: int = 42
    data: DataConfig = field(default_factory=DataConfig)
    vocabulary: VocabularyConfig = field(default_factory=VocabularyConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    training_data: str = ""            # free text for the model card
    licence: str = "GPL-2.0-or-later"

    def to_dict(self) -> dict:
        return asdict(self)


def _build(cls, d: dict):
    known = {f.name: f for f in fields(cls)}
    unknown = set(d) - set(known)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} keys: {sorted(unknown)}")
    kwargs = {}
    for k, v in d.items():
        sub = {"data": DataConfig, "vocabulary": VocabularyConfig, "optim": OptimConfig}.get(k) if cls is TrainConfig else None
        kwargs[k] = _build(sub, v) if sub else v
    return cls(**kwargs)


def load_config(path: str | Path, overrides: dict | None = None) -> TrainConfig:
    """Read a JSON recipe config; ``overrides`` (dotted keys) win, e.g. {"optim.max_steps": 2}."""
    d = json.loads(Path(path).read_text())
    for key, value in (overrides or {}).items():
        node = d
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return _build(TrainConfig, d)
