"""sen recipe: SEN stage 2, change captioning with the pre-trained single-stream extractor (seed paper 003).

What the paper fixes (Sec. IV-B-1, IV-F-2) and where it is here (``training/configs/sen_levircc.json``):

* **Backbone init.** ``backbone_init`` names the sen-pretrain file (stage 1, safetensors); its weights become
  SEN's extractor (``ResNetBackbone.load_pretrained``). Its metadata must match the architecture (backbone,
  6-band stem, input order) and its normalisation becomes the model's. Any torchvision-layout ResNet file also
  loads (Table II's "ImageNet (3C)": the RGB stem is repeated for the 6 bands); without one the extractor starts
  from random weights (Table II's "Random") and the recipe says so.
* **Fine-tuning from conv2_x** (Table IX's best): ``SENConfig.freeze_stem`` (on in both registered SEN
  configurations) keeps conv1/bn1's weights fixed, so the optimiser never sees them; conv2_x onwards train.
* **Optimiser:** Adam, lr 2e-4, batch 128, at most 40 epochs, seed 42; after each epoch validation BLEU-4, and
  ``optim.scheduler: "plateau"`` multiplies the lr by 0.7 once three epochs in a row bring no new best BLEU-4; the
  epoch with the best validation BLEU-4 is exported. The paper decays "the decoder's learning rate" only: the
  optimiser holds two groups, ``encoder`` (extractor, P, SFE, CAGD) and ``decoder`` (the caption decoder), and
  ``optim.plateau_groups: ["decoder"]`` decays the second alone. No gradient clipping (none is stated).
* **Loss:** caption cross-entropy (Eq. 17), one of the five references per pair and step (as the other LEVIR-CC
  recipes here). Validation decodes greedily (speed); the exported model decodes with beam 3 (``beam_size``).
* **No change head.** SEN only captions: ``pair_with`` (a change-detector model name, or its card path) is
  checked before training (it must exist, detect change and read the same bands) and written into the exported
  card as the model zoo pairs captioners (:mod:`changescribe.core.models.pairing`): a name stays a name (found
  beside the card or in the model folders at load time), a card path becomes a path relative to the exported
  card. Without ``pair_with`` the model file needs a detector at run time (``--detector``).
"""

from __future__ import annotations

import logging
import os
import random
from pathlib import Path
from typing import Any

import torch

from changescribe.core.model_api import InputSpec, normalise
from changescribe.core.model_file import ModelFileError, read_card, resolve_model, sha256_file
from changescribe.core.model_loading import looks_like_card_path, model_dirs
from changescribe.core.models.adapter import TorchChangeModel
from changescribe.core.models.pairing import PairingSide, check_pairing
from changescribe.core.models.registry import build_model

from ..caption_vocabulary import build_vocabulary, training_captions
from ..config import TrainConfig
from ..datasets import build_dataset
from ..datasets.augment import check_for_captions
from ..engine import Runtime, Task, export_model_file, fit, runtime, seed_everything
from ..evaluate import evaluate
from ..losses import caption_loss
from .sen_pretrain import read_backbone_metadata, sen_config

log = logging.getLogger(__name__)


def train(cfg: TrainConfig, out_dir: str | Path, device: str = "cpu", resume: bool = False,
          ddp: bool = False) -> Path | None:
    """Train and export; returns the model card path (None on DDP ranks > 0)."""
    with runtime(device, ddp) as rt:
        return _train(cfg, out_dir, rt, resume)


def pairing(pair_with: str, out_dir: str | Path, bands: int) -> tuple[str, dict[str, Any] | None]:
    """(the card's ``pair_with`` value, the partner's card or None) for a configured detector.

    A card path must exist and is rewritten relative to ``out_dir`` (where the exported card lies); a name is
    kept, and looked up now (``out_dir``, then the model folders) only to check it early: a name not found here
    is allowed (it may be installed beside the model later) with a warning. The rules are core's
    (:func:`~changescribe.core.models.pairing.check_pairing`), checked on the cards before anything trains."""
    if looks_like_card_path(pair_with):
        card = read_card(resolve_model(pair_with))
        target = Path(card["_card_path"]).resolve()
        try:
            value = Path(os.path.relpath(target, Path(out_dir).resolve())).as_posix()
        except ValueError:  # another drive (Windows): keep it absolute
            value = target.as_posix()
    else:
        value = pair_with
        try:
            card = read_card(resolve_model(pair_with, model_dirs([out_dir])))
        except ModelFileError as e:
            log.warning("pair_with %r is not installed here (%s); the card names it, so it must be found "
                        "beside the model or in a model folder when the model is loaded", pair_with, e)
            return value, None
    captioner = PairingSide(name="sen", detects=False, captions=True, bands=bands, paired=False)
    check_pairing(PairingSide.of_card(card), captioner)
    return value, card


def backbone_init(cfg: TrainConfig, sen) -> tuple[InputSpec, dict[str, Any]]:
    """The model's input spec (the pre-training's normalisation when known) and what the card records about
    the extractor's initialisation; refuses a sen-pretrain file made for another extractor."""
    if not cfg.backbone_init:
        log.warning("sen: no backbone_init, the extractor starts from random weights (SEN Table II 'Random'); "
                    "run the sen-pretrain recipe first for the paper's bi-temporal initialisation")
        return InputSpec(bands=sen.in_channels, tile_size=cfg.tile_size, gsd=cfg.gsd), {"backbone_init": None}
    path = Path(cfg.backbone_init)
    if not path.is_file():
        raise ValueError(f"backbone_init {path} not found (sen-pretrain writes OUT/<model_name>.safetensors)")
    meta = read_backbone_metadata(path)
    info = {"file": path.name, "sha256": sha256_file(path)}
    if meta is None:
        log.info("backbone_init %s is not a sen-pretrain file: loaded as a torchvision ResNet", path)
        return InputSpec(bands=sen.in_channels, tile_size=cfg.tile_size, gsd=cfg.gsd), {"backbone_init": info}
    want = {"backbone": sen.backbone, "backbone_stages": sen.backbone_stages, "in_channels": 2 * sen.in_channels,
            "input_order": sen.input_order}
    wrong = {k: (meta.get(k), v) for k, v in want.items() if meta.get(k) != v}
    if wrong:
        raise ValueError(f"backbone_init {path} was pre-trained for another extractor: "
                         + ", ".join(f"{k} {got!r} (this SEN: {exp!r})" for k, (got, exp) in wrong.items()))
    info.update({"name": meta.get("name"), "contrastive": meta.get("contrastive"), "data": meta.get("data"),
                 "epochs": (meta.get("training") or {}).get("epochs")})
    spec = InputSpec(bands=sen.in_channels, mean=tuple(meta["mean"]), std=tuple(meta["std"]),
                     tile_size=cfg.tile_size, gsd=cfg.gsd)
    return spec, {"backbone_init": info}


def optimiser_group(name: str) -> str:
    """SEN's two learning-rate groups: the caption decoder (its rate decays on a plateau) and all before it."""
    return "decoder" if name.startswith("decoder.") else "encoder"


def _train(cfg: TrainConfig, out_dir: str | Path, rt: Runtime, resume: bool) -> Path | None:
    seed_everything(cfg.seed)
    d = cfg.data
    if d.source in ("levircd", "multidate"):
        raise ValueError(f"sen trains captions: data.source {d.source!r} has none (use levircc, levirmci, synthetic)")
    check_for_captions(d.augment, "sen")
    sen = sen_config(cfg)
    spec, run_info = backbone_init(cfg, sen)
    card_fields: dict[str, Any] = {}
    if cfg.pair_with:
        card_fields["pair_with"], partner = pairing(cfg.pair_with, out_dir, spec.bands)
        if partner is not None:
            run_info["pair_with"] = {"name": partner["name"], "sha256": partner["sha256"]}
    elif rt.main:
        log.warning("sen: no pair_with - SEN has no change head, so the model file needs a detector at run time")
    train_set = build_dataset(d, d.train_split, train=True, progress=rt.main)
    val_set = build_dataset(d, d.val_split, progress=rt.main)
    vocab = build_vocabulary(cfg, training_captions(train_set))
    module, arch_cfg = build_model(cfg.architecture, sen, input_spec=spec, vocabulary=vocab,
                                   backbone_weights=cfg.backbone_init)

    def loss(model, batch: dict, device: torch.device):
        before = normalise(batch["before"].to(device).float(), spec)
        after = normalise(batch["after"].to(device).float(), spec)
        # One of the five references per pair and step (python's random, reseeded per epoch by the engine).
        tokens = vocab.encode([random.choice(caps) if caps else "" for caps in batch["captions"]]).to(device)
        cap = caption_loss(model(before, after, tokens[:, :-1]).float(), tokens[:, 1:])
        return cap, {}

    def validate(module, device) -> dict[str, float]:
        model = TorchChangeModel(module, spec, vocab, name=cfg.model_name, version=cfg.model_version,
                                 architecture=cfg.architecture)
        return evaluate(model, val_set, cfg.optim.batch_size, num_workers=cfg.optim.num_workers)

    def score(metrics: dict[str, float]) -> float:
        return metrics.get("BLEU-4", float("nan"))

    def export(module, metrics: dict[str, float], run: dict) -> Path:
        return export_model_file(cfg, out_dir, module, arch_cfg, spec, vocab, metrics, run, len(train_set), val_set,
                                 **card_fields)

    task = Task(module, train_set, val_set, loss, validate, score, export,
                val_columns=("BLEU-4", "CIDEr-D", "ROUGE-L", "S_m*"), extra_run_info=run_info,
                param_group=optimiser_group)
    return fit(cfg, task, out_dir, rt, resume)
