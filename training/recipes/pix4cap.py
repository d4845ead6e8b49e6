"""Pix4Cap recipe: joint change-mask + caption training, L_total = L_det + L_cap (Eq. 7–9), Adam.

Data (``data.source``):

* ``synthetic`` - the generator's true masks and captions;
* ``levircc`` - LEVIR-CC captions with CD pseudo-labels as masks (``data.pseudo_labels``: the folder the
  ``pseudo-labels`` step writes from a trained change detector, as in the paper, which used BIT). Without
  pseudo-labels the masks are unlabelled (255) and only the caption loss trains;
* ``levirmci`` - LEVIR-MCI's annotated change maps (binary), e.g. the analysts' annotation export.

Captions: one of the five references per pair and step, as in the LEVIR-CC recipes. Geometric augmentation
is off unless ``data.augment.geometric`` (captions name positions); time swap is refused. The best epoch
(validation IoU + BLEU-4) is exported to a model file the plugin loads.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
from pathlib import Path

import torch

from changescribe.core.model_api import InputSpec, normalise
from changescribe.core.models.adapter import TorchChangeModel
from changescribe.core.models.backbones import input_normalisation
from changescribe.core.models.registry import build_model, get_entry

from ..caption_vocabulary import build_vocabulary, training_captions
from ..config import TrainConfig
from ..datasets import build_dataset
from ..datasets.augment import check_for_captions
from ..engine import Runtime, Task, export_model_file, fit, runtime, seed_everything
from ..evaluate import evaluate
from ..losses import pix4cap_loss

log = logging.getLogger(__name__)

__all__ = ["train", "evaluate", "build_vocabulary", "seed_everything"]


def train(cfg: TrainConfig, out_dir: str | Path, device: str = "cpu", resume: bool = False,
          ddp: bool = False) -> Path | None:
    """Train and export; returns the model card path (None on DDP ranks > 0). ``out_dir/last.pt`` after
    every epoch; ``resume`` continues from it."""
    with runtime(device, ddp) as rt:
        return _train(cfg, out_dir, rt, resume)


def _train(cfg: TrainConfig, out_dir: str | Path, rt: Runtime, resume: bool) -> Path | None:
    seed_everything(cfg.seed)
    d = cfg.data
    if d.source == "levircd":
        raise ValueError("pix4cap trains captions: LEVIR-CD has none (use levircc with pseudo-labels, or levirmci)")
    check_for_captions(d.augment, "pix4cap")
    if d.augment.geometric and rt.main:
        log.warning("data.augment.geometric flips/rotates pairs whose captions name positions (left/top/...)")
    if d.source == "levircc" and not d.pseudo_labels and rt.main:
        log.warning("LEVIR-CC without data.pseudo_labels: no change masks, only the caption loss trains")
    train_set = build_dataset(d, d.train_split, train=True, progress=rt.main)
    val_set = build_dataset(d, d.val_split, progress=rt.main)
    vocab = build_vocabulary(cfg, training_captions(train_set))
    arch_cfg = dataclasses.replace(get_entry(cfg.architecture).config, **cfg.config_overrides)
    mean, std = input_normalisation(arch_cfg.backbone)  # what the pretrained backbone expects
    spec = InputSpec(bands=3, mean=mean, std=std, tile_size=cfg.tile_size, gsd=cfg.gsd)
    # backbone_init: "imagenet" (EfficientNet-Lite0: the installed package's weights) or a local weights file
    module, arch_cfg = build_model(cfg.architecture, arch_cfg, input_spec=spec, vocabulary=vocab,
                                   backbone_weights=cfg.backbone_init)
    if cfg.init_from:
        _start_from(module, cfg, vocab)

    def loss(model, batch: dict, device: torch.device):
        before = normalise(batch["before"].to(device).float(), spec)
        after = normalise(batch["after"].to(device).float(), spec)
        # One of the five references per pair and step (python's random, reseeded per epoch by the engine).
        tokens = vocab.encode([random.choice(caps) if caps else "" for caps in batch["captions"]]).to(device)
        cd_logits, cap_logits = model(before, after, tokens[:, :-1])
        return pix4cap_loss(cd_logits.float(), batch["mask"].to(device), cap_logits.float(), tokens[:, 1:], cfg.loss)

    def wrap(module) -> TorchChangeModel:
        return TorchChangeModel(module, spec, vocab, name=cfg.model_name, version=cfg.model_version,
                                architecture=cfg.architecture)

    def validate(module, device) -> dict[str, float]:
        return evaluate(wrap(module), val_set, cfg.optim.batch_size)

    def score(m: dict[str, float]) -> float:
        iou = m.get("IoU", 0.0)
        return (0.0 if math.isnan(iou) else iou) + m.get("BLEU-4", 0.0)

    def export(module, metrics: dict[str, float], run: dict) -> Path:
        return export_model_file(cfg, out_dir, module, arch_cfg, spec, vocab, metrics, run, len(train_set), val_set)

    task = Task(module, train_set, val_set, loss, validate, score, export, loss_parts=("loss_det", "loss_cap"),
                val_columns=("IoU", "F1", "BLEU-4", "CIDEr-D"))
    return fit(cfg, task, out_dir, rt, resume)


def _start_from(module, cfg: TrainConfig, vocab) -> None:
    """Fine-tuning: the weights of a model file of the same architecture and vocabulary (e.g. the shipped model,
    adapted to an analyst's annotation export)."""
    from changescribe.core.model_file import read_card, read_weights

    card = read_card(cfg.init_from)
    if card["architecture"] != cfg.architecture:
        raise ValueError(f"init_from {cfg.init_from} is a {card['architecture']!r} model, not {cfg.architecture!r}")
    words = (card.get("vocabulary") or {}).get("words")
    if words is not None and list(words) != vocab.itos:
        raise ValueError(f"init_from {cfg.init_from} has another vocabulary than this run's")
    missing, unexpected = module.load_state_dict(read_weights(card), strict=False)
    if missing or unexpected:
        raise ValueError(f"init_from {cfg.init_from} does not fit {cfg.architecture}: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}")
    log.info("starting from the weights of %s", cfg.init_from)
