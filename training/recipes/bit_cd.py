"""bit-cd recipe: the BIT change detector (registry ``bit-cd``) trained on change masks.

Data: LEVIR-CD (``levircd``, 256² crops of the 1024² images), LEVIR-MCI / the annotation export
(``levirmci``, any change class -> change), LEVIR-CC with pseudo-labels (``levircc``), or synthetic pairs.
Loss: pixel cross-entropy (``loss: "ce"``, BIT) or cross-entropy + soft Dice (``"ce+dice"``).

Optimiser defaults follow BIT (Chen, Qi & Shi, "Remote sensing image change detection with transformers",
IEEE TGRS 2021, Sec. IV-B, and its public code): SGD, momentum 0.99, weight decay 5e-4, learning rate 0.01
decayed linearly to 0 over 200 epochs, batch size 8, 256 x 256 crops. Their LEVIR-CD augmentations are
flips, a rescale by U(1, 1.2) cropped back to the tile, and Gaussian blur (sigma U(0, 1), one per pair); here
flips + rot90, a random resized crop of area 0.694..1 and that blur (``data.augment``: ``geometric``,
``crop``, ``blur``; datasets/augment.py), plus per-date colour jitter. Validation: Precision / Recall / F1 /
IoU / OA of the change class on the validation split; the epoch with the best F1 is exported (BIT keeps the
best validation F1 too).

The exported model file is change-only (``can_caption`` False): the pipeline maps changes with it and
summarises regions without captions, and the pseudo-labels step uses it to label LEVIR-CC.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from changescribe.core.model_api import InputSpec, normalise
from changescribe.core.models.adapter import TorchChangeModel
from changescribe.core.models.registry import build_model, get_entry

from ..config import TrainConfig
from ..datasets import build_dataset, collate
from ..engine import Runtime, Task, export_model_file, fit, runtime, seed_everything
from ..losses import cd_loss
from ..metrics import MaskScores

MASK_METRICS = ("Precision", "Recall", "F1", "IoU", "OA")


def train(cfg: TrainConfig, out_dir: str | Path, device: str = "cpu", resume: bool = False,
          ddp: bool = False) -> Path | None:
    """Train and export; returns the model card path (None on DDP ranks > 0)."""
    with runtime(device, ddp) as rt:
        return _train(cfg, out_dir, rt, resume)


def evaluate_masks(model: TorchChangeModel, data, batch_size: int, num_workers: int = 0) -> dict[str, float]:
    scores = MaskScores()
    for batch in DataLoader(data, batch_size=batch_size, collate_fn=collate, num_workers=num_workers):
        scores.update(model.change_probability(batch["before"].float(), batch["after"].float()), batch["mask"])
    return scores.compute()


def _train(cfg: TrainConfig, out_dir: str | Path, rt: Runtime, resume: bool) -> Path | None:
    seed_everything(cfg.seed)
    entry = get_entry(cfg.architecture)
    if entry.captions:
        raise ValueError(f"bit-cd trains change detectors; {cfg.architecture!r} is a captioner "
                         "(use its own recipe)")
    if cfg.loss not in ("ce", "ce+dice"):
        raise ValueError(f"bit-cd: loss must be 'ce' or 'ce+dice', got {cfg.loss!r}")
    d = cfg.data
    train_set = build_dataset(d, d.train_split, train=True, progress=rt.main)
    val_set = build_dataset(d, d.val_split, progress=rt.main)
    spec = InputSpec(bands=3, tile_size=cfg.tile_size, gsd=cfg.gsd)
    arch_cfg = dataclasses.replace(entry.config, **cfg.config_overrides)
    module, arch_cfg = build_model(cfg.architecture, arch_cfg, input_spec=spec)

    def loss(model, batch: dict, device: torch.device):
        before = normalise(batch["before"].to(device).float(), spec)
        after = normalise(batch["after"].to(device).float(), spec)
        return cd_loss(model(before, after).float(), batch["mask"].to(device), cfg.loss)

    def validate(module, device) -> dict[str, float]:
        model = TorchChangeModel(module, spec, None, name=cfg.model_name, version=cfg.model_version,
                                 architecture=cfg.architecture)
        return evaluate_masks(model, val_set, cfg.optim.batch_size, cfg.optim.num_workers)

    def score(m: dict[str, float]) -> float:
        f1 = m.get("F1", float("nan"))
        return -math.inf if math.isnan(f1) else f1

    def export(module, metrics: dict[str, float], run: dict) -> Path:
        return export_model_file(cfg, out_dir, module, arch_cfg, spec, None, metrics, run, len(train_set), val_set)

    parts = ("loss_ce",) if cfg.loss == "ce" else ("loss_ce", "loss_dice")
    task = Task(module, train_set, val_set, loss, validate, score, export, loss_parts=parts,
                val_columns=MASK_METRICS)
    return fit(cfg, task, out_dir, rt, resume)
