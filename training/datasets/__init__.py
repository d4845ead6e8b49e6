"""Bi-temporal datasets returning aligned before/after tensors, a change mask and captions.

Every source returns the same item (see :mod:`.common`): ``before``/``after`` uint8 (3, H, W), ``mask`` uint8
(H, W) in {0, 1} or 255 where unlabelled, ``captions`` (list, may be empty) and ``name``. Sources:

* ``synthetic`` - :class:`.synthetic.SyntheticChangeDataset` (training.synthetic scenes, true masks, captions);
* ``levircc`` - :class:`.levir.LevirCCDataset` (captions; masks from ``data.pseudo_labels`` when given);
* ``levirmci`` - :class:`.levir.LevirMCIDataset` (captions + change maps; also the annotation export);
* ``levircd`` - :class:`.levir.LevirCDDataset` (masks, crops of ``data.crop_size``).

Tokenisation of captions stays in :mod:`changescribe.core.vocabulary` (saved with the model).
"""

from __future__ import annotations

from pathlib import Path

from ..config import DataConfig
from .augment import AugmentedDataset, BiTemporalAugment
from .common import IGNORE, collate

SOURCES = ("synthetic", "real-change", "levircc", "levirmci", "levircd")
VALIDATION_SEED_OFFSET = 1_000_000  # synthetic validation pairs: seeds disjoint from training

__all__ = ["SOURCES", "IGNORE", "collate", "build_dataset", "describe_data", "describe_split"]


def build_dataset(d: DataConfig, split: str, train: bool = False, progress: bool = True):
    """The dataset of ``split`` for a data config; training splits get the configured augmentations."""
    if d.source not in SOURCES:
        raise ValueError(f"unknown data.source {d.source!r}; known: {', '.join(SOURCES)}")
    limit = d.limit if train or d.val_limit is None else d.val_limit
    if d.source == "synthetic":
        from .synthetic import SyntheticChangeDataset

        count, seed = (d.train_pairs, d.first_seed) if train else (d.val_pairs, d.first_seed + VALIDATION_SEED_OFFSET)
        ds = SyntheticChangeDataset(count, d.size, seed, d.p_no_change, progress=progress)
    elif d.source == "real-change":
        ds = _real_change(d, train, progress)
    else:
        if not d.root:
            raise ValueError(f"data.source {d.source!r} needs data.root")
        from .levir import LevirCCDataset, LevirCDDataset, LevirMCIDataset

        if d.source == "levircc":
            ds = LevirCCDataset(d.root, split, d.captions, masks=d.pseudo_labels, limit=limit, missing=d.missing)
        elif d.source == "levirmci":
            ds = LevirMCIDataset(d.root, split, d.captions, limit=limit, missing=d.missing)
        else:
            ds = LevirCDDataset(d.root, split, d.crop_size, limit=limit)
    augment = BiTemporalAugment(d.augment)
    return AugmentedDataset(ds, augment) if train and augment.enabled else ds


def _real_change(d: DataConfig, train: bool, progress: bool):
    """Change synthesised on real imagery, plus generated scenes for the captions (training split only)."""
    from torch.utils.data import ConcatDataset

    from .real_change import RealChangeDataset, SynthesisConfig, load_real_scenes
    from .synthetic import SyntheticChangeDataset

    if not d.labelled:
        raise ValueError("data.source 'real-change' needs data.labelled: [{\"image\": ..., \"footprints\": ...}]")
    scenes = load_real_scenes(d.labelled, d.backgrounds or [])
    count, seed = (d.train_pairs, d.first_seed) if train else (d.val_pairs, d.first_seed + VALIDATION_SEED_OFFSET)
    real = RealChangeDataset(scenes, count, d.size, seed, SynthesisConfig(**d.synthesis), d.object_gsd_ratio)
    if not train:
        return real
    parts = [real]
    if d.generated_pairs:
        parts.append(SyntheticChangeDataset(d.generated_pairs, d.size, d.first_seed, d.p_no_change,
                                            progress=progress, ignore_masks=not d.generated_masks))
    if d.real_pairs:
        from .levir import LevirCDDataset
        from .real_change import RandomCrops

        parts += [RandomCrops(LevirCDDataset(folder, None, crop_size=None), d.size, d.real_repeat, d.first_seed)
                  for folder in d.real_pairs]
    return ConcatDataset(parts) if len(parts) > 1 else real


def describe_data(d: DataConfig, train_len: int, val_len: int) -> str:
    """One line for the model card's ``training_data``."""
    if d.source == "synthetic":
        return (f"synthetic generator: {d.train_pairs} pairs of {d.size}² px, seeds {d.first_seed}.."
                f"{d.first_seed + d.train_pairs - 1}")
    if d.source == "real-change":
        images = ", ".join(Path(item["image"]).name for item in d.labelled or [])
        gen = f" + {d.generated_pairs} generated scenes (captions only)" if d.generated_pairs else ""
        if d.real_pairs:
            gen += (f" + real labelled pairs from {', '.join(Path(p).name for p in d.real_pairs)} "
                    f"({d.real_repeat} random {d.size}² crops per pair and epoch)")
        return (f"change synthesised on real imagery: {d.train_pairs} pairs of {d.size}² px, objects cut along "
                f"footprints from {images}, pasted into {len(d.backgrounds or []) + len(d.labelled or [])} real "
                f"background sources{gen}")
    name = {"levircc": "LEVIR-CC", "levirmci": "LEVIR-MCI", "levircd": "LEVIR-CD"}[d.source]
    extra = ""
    if d.source == "levircc" and d.pseudo_labels:
        extra = f", masks: CD pseudo-labels from {Path(d.pseudo_labels).name}"
    if d.source == "levircd" and d.crop_size:
        extra = f", {d.crop_size}² crops"
    return f"{name} ({Path(d.root or '').name}): {train_len} {d.train_split} / {val_len} {d.val_split} pairs{extra}"


def describe_split(d: DataConfig, val_len: int) -> str:
    """The validation split a model card's metrics were measured on."""
    if d.source == "real-change":
        return f"held-out change synthesised on real imagery (seeds from {d.first_seed + VALIDATION_SEED_OFFSET}, n={d.val_pairs})"
    if d.source == "synthetic":
        return f"held-out synthetic pairs (seeds from {d.first_seed + VALIDATION_SEED_OFFSET}, n={d.val_pairs})"
    return f"{d.source} {d.val_split} split ({val_len} pairs)"
