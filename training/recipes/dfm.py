"""dfm recipe: DFM (seed paper 002) trained with caption cross-entropy + the Text-guided Gated Contrastive Loss.

What the paper fixes (Sec. III-B, III-C, IV-A) and where it is here:

* **Pre-trained CD encoder.** ``cd_model`` names a ``bit-cd`` model file (the bit-cd recipe's output). Its
  BIT configuration becomes ``DFMConfig.cd_overrides`` and its weights are loaded into ``DFM.cd``
  (safetensors, sha256-checked, never unpickled); it stays frozen ("stable change detection knowledge",
  ``DFMConfig.freeze_cd``). The exported DFM therefore predicts masks with that BIT's head, and inputs are
  normalised with the CD model's statistics so the frozen BIT sees what it was trained on.
* **TGCL** (training/losses.py): captions are embedded by a frozen sentence encoder read from local files
  (training/sentence_encoder.py; the paper uses All-MPNet-base-v2), projected into the visual latent space by
  DFM's learnable ``text_proj``, compared with the [CLS] difference embedding through ``exp(t) * cos`` with
  DFM's learnable logit scale ``t`` (CLIP initialisation 1/0.07, scale clamped at 100 as in CLIP), and
  trained with a symmetric cross-entropy over the pairs whose caption describes a change (the gate drops
  LEVIR-CC's "no change" sentences).
* **Objective** (Eq. 6): ``loss_weights.caption * L_cap + loss_weights.tgcl * L_TGCL``.

Documented interpretations (the stored paper text lost its equations' symbols and every hyper-parameter
value): both loss weights 1.0; Adam with RSCaMa's settings (DFM's baseline code: lr 1e-4, effective batch
64, 80 epochs, no gradient clipping); one of the five references per pair and step feeds both losses; the
best epoch is the one with the best validation BLEU-4 (RSCaMa keeps its best BLEU-4 too).

* **Vision encoder init.** ``config_overrides.clip_checkpoint`` names LOCAL CLIP ViT-B/32 weights (OpenAI's
  ``ViT-B-32.pt``, an open_clip file or a Hugging Face CLIP folder; :mod:`changescribe.core.models.pretrained`)
  that initialise DFM's ViT, as in DFM's CLIP-based baseline. The paper config names one; a missing file stops
  the run before any data is read. Set it to null to start the ViT from random weights (the synthetic config).
* **DDP.** TGCL gathers every process's change and caption embeddings (with gradient), so negatives and the
  gate's count span the global batch, exactly as on one device (``losses.global_gated_contrastive_loss``).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
from pathlib import Path

import torch
from torch import nn

from changescribe.core.model_api import InputSpec, normalise
from changescribe.core.model_file import read_card
from changescribe.core.model_loading import load_model_file
from changescribe.core.models.adapter import TorchChangeModel
from changescribe.core.models.bit_cd import BitCDConfig
from changescribe.core.models.dfm import DFM
from changescribe.core.models.registry import build_model, config_from_dict, get_entry

from ..caption_vocabulary import build_vocabulary, training_captions
from ..config import TrainConfig
from ..datasets import build_dataset
from ..datasets.augment import check_for_captions
from ..engine import Runtime, Task, export_model_file, fit, runtime, seed_everything
from ..evaluate import evaluate
from ..losses import change_gate, dfm_loss
from ..sentence_encoder import SentenceEncoder

log = logging.getLogger(__name__)

DEFAULT_LOSS_WEIGHTS = {"caption": 1.0, "tgcl": 1.0}


class TGCLForward(nn.Module):
    """DFM's training forward: caption logits and the TGCL similarity matrix from ONE encoder pass.

    The engine wraps this module (not DFM itself) in DDP, so both losses' gradients are synchronised."""

    def __init__(self, dfm: DFM) -> None:
        super().__init__()
        self.dfm = dfm

    def forward(self, before: torch.Tensor, after: torch.Tensor, tokens: torch.Tensor, text_embedding: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Caption logits, then TGCL's change and caption embeddings and logit scale."""
        feats = self.dfm.encode(before, after)
        memory, _ = self.dfm.caption_memory(feats)
        return (self.dfm.decoder(tokens, memory), *self.dfm.contrastive_embeddings(feats, text_embedding))


def loss_weights(cfg: TrainConfig) -> dict[str, float]:
    """The paper's two weights (Eq. 6), defaults overridden by ``loss_weights``; unknown names are an error."""
    unknown = set(cfg.loss_weights) - set(DEFAULT_LOSS_WEIGHTS)
    if unknown:
        raise ValueError(f"dfm: unknown loss_weights {sorted(unknown)}; known: {sorted(DEFAULT_LOSS_WEIGHTS)}")
    return {**DEFAULT_LOSS_WEIGHTS, **{k: float(v) for k, v in cfg.loss_weights.items()}}


def cd_overrides_from_card(card: dict) -> dict:
    """The BIT fields of a ``bit-cd`` card that differ from BitCDConfig's defaults (in_channels follows DFM)."""
    if card["architecture"] != "bit-cd":
        raise ValueError(f"{card['_card_path']}: DFM's CD encoder is BIT; the file holds {card['architecture']!r}")
    bit = config_from_dict("bit-cd", card["config"])
    default = BitCDConfig()
    return {f.name: getattr(bit, f.name) for f in dataclasses.fields(BitCDConfig)
            if f.name != "in_channels" and getattr(bit, f.name) != getattr(default, f.name)}


def load_cd_weights(dfm: DFM, path: str | Path) -> None:
    """Load a ``bit-cd`` ChangeScribe model file (card or .safetensors, sha256-checked) into DFM's CD encoder."""
    model = load_model_file(path)
    if model.architecture != "bit-cd":
        raise ValueError(f"{path}: DFM's CD encoder is BIT; the file holds {model.architecture!r}")
    dfm.cd.load_state_dict(model.module.state_dict(), strict=True)


def train(cfg: TrainConfig, out_dir: str | Path, device: str = "cpu", resume: bool = False,
          ddp: bool = False) -> Path | None:
    """Train and export; returns the model card path (None on DDP ranks > 0)."""
    with runtime(device, ddp) as rt:
        return _train(cfg, out_dir, rt, resume)


def clip_checkpoint(cfg: TrainConfig) -> str | None:
    """``config_overrides.clip_checkpoint`` made absolute, checked before any data or model is read."""
    given = cfg.config_overrides.get("clip_checkpoint")
    if not given:
        return None
    path = Path(given).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"config_overrides.clip_checkpoint: nothing at {path}. DFM's ViT starts from CLIP ViT-B/32 weights on "
            "local disk (OpenAI's ViT-B-32.pt, an open_clip ViT-B-32 file or a Hugging Face CLIP folder; nothing "
            "is downloaded); put them there, or set clip_checkpoint to null to train the ViT from random weights")
    return str(path.resolve())


def _arch_config(cfg: TrainConfig, cd_overrides: dict, text_dim: int, clip: str | None = None):
    """The DFM config: the registry entry + ``config_overrides``, with the CD model's BIT, the encoder's width and
    the CLIP weights' absolute path."""
    entry = get_entry(cfg.architecture)
    if entry.builder is not DFM:
        raise ValueError(f"the dfm recipe trains DFM architectures (dfm, dfm-small), not {cfg.architecture!r}")
    given = cfg.config_overrides
    if "cd_overrides" in given and dict(given["cd_overrides"]) != cd_overrides:
        raise ValueError(f"config_overrides.cd_overrides {given['cd_overrides']} contradict the CD model file "
                         f"({cd_overrides}); leave it out, the recipe takes it from cd_model")
    if "text_dim" in given and int(given["text_dim"]) != text_dim:
        raise ValueError(f"config_overrides.text_dim {given['text_dim']} != the sentence encoder's {text_dim} dims")
    return dataclasses.replace(entry.config, **{**given, "cd_overrides": cd_overrides, "text_dim": text_dim,
                                                "clip_checkpoint": clip})


def _train(cfg: TrainConfig, out_dir: str | Path, rt: Runtime, resume: bool) -> Path | None:
    seed_everything(cfg.seed)
    d = cfg.data
    if d.source == "levircd":
        raise ValueError("dfm trains captions: LEVIR-CD has none (use levircc or levirmci)")
    check_for_captions(d.augment, "dfm")
    weights = loss_weights(cfg)
    clip = clip_checkpoint(cfg)
    if clip is None and rt.main:
        log.warning("dfm: no config_overrides.clip_checkpoint - the ViT starts from random weights, not CLIP's")
    if not cfg.cd_model:
        raise ValueError("dfm needs cd_model: a bit-cd model file (train one with the bit-cd recipe), whose "
                         "weights become DFM's pre-trained CD encoder")
    cd_card = read_card(cfg.cd_model)
    cd_overrides = cd_overrides_from_card(cd_card)
    cd_spec = InputSpec.from_dict(cd_card["input"])
    if cd_spec.gsd is not None and cfg.gsd is not None and not math.isclose(cd_spec.gsd, cfg.gsd):
        log.warning("the CD model was trained at %s m/px, DFM trains at %s m/px", cd_spec.gsd, cfg.gsd)
    # before any data is read: a missing sentence encoder fails the run at once
    encoder = SentenceEncoder(cfg.text_encoder.path, rt.device, cfg.text_encoder.max_length,
                              cfg.text_encoder.batch_size)
    train_set = build_dataset(d, d.train_split, train=True, progress=rt.main)
    val_set = build_dataset(d, d.val_split, progress=rt.main)
    vocab = build_vocabulary(cfg, training_captions(train_set))
    # the frozen BIT must see inputs normalised as in its own training
    spec = InputSpec(bands=3, mean=cd_spec.mean, std=cd_spec.std, tile_size=cfg.tile_size, gsd=cfg.gsd)
    arch_cfg = _arch_config(cfg, cd_overrides, encoder.dim, clip)
    dfm, arch_cfg = build_model(cfg.architecture, arch_cfg, input_spec=spec, vocabulary=vocab)
    dfm.load_pretrained()  # the ViT from clip_checkpoint
    load_cd_weights(dfm, cfg.cd_model)
    module = TGCLForward(dfm)

    def loss(model, batch: dict, device: torch.device):
        before = normalise(batch["before"].to(device).float(), spec)
        after = normalise(batch["after"].to(device).float(), spec)
        # One of the five references per pair and step, for both losses (reseeded per epoch by the engine).
        captions = [random.choice(caps) if caps else "" for caps in batch["captions"]]
        tokens = vocab.encode(captions).to(device)
        cap_logits, v, t, scale = model(before, after, tokens[:, :-1], encoder.encode(captions))
        total, parts = dfm_loss(cap_logits.float(), tokens[:, 1:], v.float(), t.float(), scale.float(),
                                change_gate(captions), weights)
        parts["logit_scale"] = float(dfm.logit_scale.detach().exp())
        return total, parts

    def wrap(m: TGCLForward) -> TorchChangeModel:
        return TorchChangeModel(m.dfm, spec, vocab, name=cfg.model_name, version=cfg.model_version,
                                architecture=cfg.architecture)

    def validate(m: TGCLForward, device) -> dict[str, float]:
        return evaluate(wrap(m), val_set, cfg.optim.batch_size, num_workers=cfg.optim.num_workers)

    def score(metrics: dict[str, float]) -> float:
        return metrics.get("BLEU-4", float("nan"))

    def export(m: TGCLForward, metrics: dict[str, float], run: dict) -> Path:
        return export_model_file(cfg, out_dir, m.dfm, arch_cfg, spec, vocab, metrics, run, len(train_set), val_set)

    run_info = {"cd_model": {"name": cd_card["name"], "sha256": cd_card["sha256"]},
                "text_encoder": {"path": str(encoder.path), "model": type(encoder.model).__name__,
                                 "dim": encoder.dim, "pooling": encoder.pooling}}
    task = Task(module, train_set, val_set, loss, validate, score, export,
                loss_parts=("loss_cap", "loss_tgcl", "logit_scale"),
                val_columns=("BLEU-4", "CIDEr-D", "ROUGE-L", "F1"),
                # a fine-tuned BIT (freeze_cd false) has a change head the caption losses never reach
                find_unused_parameters=not arch_cfg.freeze_cd, extra_run_info=run_info)
    return fit(cfg, task, out_dir, rt, resume)
