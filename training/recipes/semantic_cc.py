"""semantic-cc recipe: Semantic-CC (seed paper 001) with the paper's three-stage training (Sec. III-F, IV-C).

What the paper fixes and where it is here:

* **Loss** (Eq. 9): L_cd is the pixel cross-entropy of the change mask, L_cc the token cross-entropy of the
  caption, L = L_cc + lambda * L_cd with lambda = 0.5 (``SemanticCCConfig.cd_loss_weight``; change it with
  ``config_overrides``). See :func:`..losses.semantic_cc_loss`.
* **Three stages per epoch** (engine :class:`~..engine.Stage`), in this order: (i) **cd**: L_cd, trains the
  image encoder's trainable part (SAM ViT LoRA factors and the BCSFs; everything when ``freeze_pretrained``
  is false), the aggregation neck and the CD decoder; (ii) **cc**: L_cc with the image encoder frozen, trains
  the neck and the caption decoder (Q-Former, query tokens, enhancer, the LLM's LoRA factors); (iii)
  **joint**: L, trains the neck only, "keeping other parameters frozen". Each stage is a full pass over its
  training set (see Data). One AdamW optimiser and one schedule run through all stages (the paper names one optimiser);
  a parameter frozen in a stage has no gradient there, so AdamW neither moves nor decays it.
* **Optimiser**: AdamW, lr 1e-4, cosine annealing after a linear warm-up, 300 epochs, batch size 1.
* **Instructions**: one of the paper's four prompts per training batch; inference uses the first.
* **Weights** (nothing is downloaded): ``config_overrides.sam_checkpoint`` (SAM's image-encoder checkpoint,
  safetensors or a weights-only torch file), ``config_overrides.llm_path`` (a Hugging Face LLM folder with
  its tokenizer, read with ``local_files_only``) and ``config_overrides.qformer_checkpoint`` (MiniGPT-4's
  BLIP-2 Q-Former, ``blip2_pretrained_flant5xxl.pth``). They are checked before any data is read and stored as
  absolute paths in the model card: the model file keeps only the trained tensors and re-reads the frozen ones
  from there. Without ``llm_path`` the word vocabulary of the training captions is the LLM's tokenizer.

Documented interpretations:

* **Data** (Sec. III-F). The paper trains stage i on D_cd (pairs with a change mask, LEVIR-CD), stage ii on
  D_cc (pairs with captions, LEVIR-CC) and stage iii on D_cd-cc (the pairs that carry both labels). Here
  ``data`` is D_cc, and D_cd-cc is ``data`` as well: its pairs must then carry masks too (LEVIR-MCI, LEVIR-CC
  with ``pseudo_labels``, synthetic pairs), so the joint stage sums both losses over the same pairs, as
  Eq. 9 is written, rather than mixing batches of two datasets. ``data_cd`` (optional) is D_cd, the cd
  stage's own set (``levircd`` in the paper configuration); without it all three stages read ``data``.
  With ``data_cd``, validation reports the mask metrics (IoU, F1, ...) on ``data_cd``'s validation split and
  the caption metrics on ``data``'s, and a ``data`` without masks is refused (stage iii would have nothing
  of L_cd to learn from).
* **Q-Former.** The paper inherits MiniGPT-4's pre-trained Q-Former and keeps it frozen; so does this recipe
  with ``qformer_checkpoint``. Without one, the recipe trains the Q-Former and its queries (in the cc stage)
  rather than freezing random weights.
* **Frozen pre-trained parts need their weights.** With ``freeze_pretrained`` (the paper's setting), a run
  without ``sam_checkpoint`` or without ``llm_path`` (where the LLM's base is frozen) is refused: it would
  freeze random weights.
* Warm-up length, weight decay and gradient clipping are not given by the paper; see the configs. The best
  epoch is the one with the highest validation IoU + BLEU-4 (both tasks). Test-time multi-output ensembling
  is not implemented (see core/models/semantic_cc.py).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset

from changescribe.core.model_api import InputSpec, normalise
from changescribe.core.models.adapter import TorchChangeModel
from changescribe.core.models.registry import build_model, config_from_dict, get_entry
from changescribe.core.models.semantic_cc import WEIGHTS_NOTE, SemanticCC, SemanticCCConfig

from ..caption_vocabulary import build_vocabulary, training_captions
from ..config import DataConfig, TrainConfig
from ..datasets import build_dataset, describe_data, describe_split
from ..datasets.augment import check_for_captions
from ..engine import Runtime, Stage, Task, export_model_file, fit, runtime, seed_everything
from ..evaluate import evaluate
from ..losses import caption_loss, change_loss, semantic_cc_loss

log = logging.getLogger(__name__)

IGNORE = -100  # caption targets past a caption's end
# Parameter groups by name inside SemanticCC (Sec. III-B to III-E); every parameter is in exactly one.
IMAGE_ENCODER = ("encoder.", "bcsf.")
NECK = ("neck.",)
CD_DECODER = ("cd_decoder.",)
CAPTION_DECODER = ("vision_proj.", "ln_vision.", "query_tokens", "qformer.", "enhancer.", "llm.")
STAGE_PARTS = {"cd": IMAGE_ENCODER + NECK + CD_DECODER, "cc": NECK + CAPTION_DECODER, "joint": NECK}
LOSS_PARTS = ("loss_cd", "loss_cc", "loss_joint", "loss_joint_cd", "loss_joint_cc")
MASK_METRICS = ("Precision", "Recall", "F1", "IoU", "OA")  # training/metrics.py MaskScores


def has_masks(d: DataConfig) -> bool:
    """Whether a data section's pairs carry change masks (D_cd and D_cd-cc need them)."""
    return d.source in ("synthetic", "levirmci", "levircd") or (d.source == "levircc" and bool(d.pseudo_labels))


class StageForward(nn.Module):
    """Semantic-CC's training forward, computing only the heads a stage's loss uses: under DDP every output
    must reach the loss, and a stage should not pay for a head it does not train. The engine trains (and
    checkpoints) this wrapper; the model file holds ``self.model``."""

    def __init__(self, model: SemanticCC) -> None:
        super().__init__()
        self.model = model
        self.register_load_state_dict_post_hook(_external_missing_ok)

    def forward(self, before: torch.Tensor, after: torch.Tensor, tokens: torch.Tensor | None = None,
                instruction: int = 0, detect: bool = True) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        feats = self.model.encode(before, after)
        cd = self.model.change_logits(feats) if detect else None
        cap = self.model.caption_logits(feats, tokens, instruction) if tokens is not None else None
        return cd, cap


def _external_missing_ok(wrapper: StageForward, incompatible) -> None:
    """Checkpoints leave out the frozen SAM/LLM tensors re-read from local files; SemanticCC's own hook
    matches unprefixed keys only, so the wrapper forgives them under its ``model.`` prefix."""
    incompatible.missing_keys[:] = [k for k in incompatible.missing_keys
                                    if not (k.startswith("model.") and wrapper.model.is_external(k[6:]))]


def part_of(name: str) -> str:
    """The paper's component a SemanticCC parameter belongs to (image encoder, neck, CD or caption decoder)."""
    for part, prefixes in (("image_encoder", IMAGE_ENCODER), ("neck", NECK), ("cd_decoder", CD_DECODER),
                           ("caption_decoder", CAPTION_DECODER)):
        if name.startswith(prefixes):
            return part
    raise ValueError(f"Semantic-CC parameter {name!r} belongs to no component of the paper")


def caption_tokens(tokenizer, captions: list[str], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher forcing for the LLM: (inputs ``<bos> w1 .. wn``, targets ``w1 .. wn <eos>``), each row cut to
    ``max_len`` tokens with its end, padded with the pad id (inputs) and :data:`IGNORE` (targets), so a
    tokenizer whose pad id is its eos id still learns to stop."""
    rows = [[tokenizer.bos_id, *tokenizer.encode(c)[: max_len - 2], tokenizer.eos_id] for c in captions]
    width = max(len(r) for r in rows) - 1
    inputs = torch.full((len(rows), width), tokenizer.pad_id, dtype=torch.long)
    targets = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    for i, r in enumerate(rows):
        inputs[i, : len(r) - 1] = torch.tensor(r[:-1])
        targets[i, : len(r) - 1] = torch.tensor(r[1:])
    return inputs, targets


def semantic_cc_stages(model: SemanticCC, spec: InputSpec, max_len: int,
                       cd_set: Dataset | None = None) -> tuple[Stage, ...]:
    """The paper's three stages (cd, cc, joint) on a :class:`StageForward` of ``model``; ``cd_set`` is the cd
    stage's own training set (D_cd; None = the task's)."""
    cfg = model.cfg
    lam = float(cfg.cd_loss_weight)

    def inputs(batch: dict, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        return (normalise(batch["before"].to(device).float(), spec),
                normalise(batch["after"].to(device).float(), spec))

    def captions(batch: dict, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, int]:
        # one of the references per pair and one instruction per batch (python's random, reseeded per epoch)
        chosen = [random.choice(caps) if caps else "" for caps in batch["captions"]]
        x, y = caption_tokens(model.tokenizer, chosen, max_len)
        return x.to(device), y.to(device), random.randrange(len(cfg.instructions))

    def cd_loss(m: nn.Module, batch: dict, device: torch.device):
        cd, _ = m(*inputs(batch, device))
        loss = change_loss(cd.float(), batch["mask"].to(device))
        return loss, {"loss_cd": float(loss.detach())}

    def cc_loss(m: nn.Module, batch: dict, device: torch.device):
        x, y, instruction = captions(batch, device)
        _, cap = m(*inputs(batch, device), x, instruction, detect=False)
        loss = caption_loss(cap.float(), y, pad_id=IGNORE)
        return loss, {"loss_cc": float(loss.detach())}

    def joint_loss(m: nn.Module, batch: dict, device: torch.device):
        x, y, instruction = captions(batch, device)
        cd, cap = m(*inputs(batch, device), x, instruction)
        total, parts = semantic_cc_loss(cd.float(), batch["mask"].to(device), cap.float(), y, lam, IGNORE)
        return total, {"loss_joint": float(total.detach()), "loss_joint_cd": parts["loss_cd"],
                       "loss_joint_cc": parts["loss_cc"]}

    def selects(parts: tuple[str, ...]):
        return lambda name: name.removeprefix("model.").startswith(parts)

    return (Stage("cd", cd_loss, selects(STAGE_PARTS["cd"]), cd_set),
            Stage("cc", cc_loss, selects(STAGE_PARTS["cc"])), Stage("joint", joint_loss, selects(STAGE_PARTS["joint"])))


def architecture_config(cfg: TrainConfig) -> SemanticCCConfig:
    """The registry entry + ``config_overrides``, local weight paths checked and made absolute."""
    entry = get_entry(cfg.architecture)
    if entry.builder is not SemanticCC:
        raise ValueError(f"the semantic-cc recipe trains Semantic-CC architectures, not {cfg.architecture!r}")
    arch = config_from_dict(cfg.architecture, {**dataclasses.asdict(entry.config), **cfg.config_overrides})
    paths = {}
    if arch.sam_checkpoint:
        sam = Path(arch.sam_checkpoint).expanduser()
        if not sam.is_file():
            raise FileNotFoundError(f"config_overrides.sam_checkpoint: no file at {sam}. {WEIGHTS_NOTE}")
        paths["sam_checkpoint"] = str(sam.resolve())
    if arch.llm_path:
        llm = Path(arch.llm_path).expanduser()
        if not (llm / "config.json").is_file():
            raise FileNotFoundError(f"config_overrides.llm_path: {llm} is not a Hugging Face model folder "
                                    f"(no config.json there). {WEIGHTS_NOTE}")
        paths["llm_path"] = str(llm.resolve())
    if arch.qformer_checkpoint:
        qformer = Path(arch.qformer_checkpoint).expanduser()
        if not qformer.exists():
            raise FileNotFoundError(f"config_overrides.qformer_checkpoint: nothing at {qformer}. {WEIGHTS_NOTE}")
        paths["qformer_checkpoint"] = str(qformer.resolve())
    if arch.freeze_pretrained and not arch.sam_checkpoint:
        raise ValueError(f"{cfg.architecture}: freeze_pretrained keeps SAM's encoder frozen, but no "
                         f"config_overrides.sam_checkpoint gives its weights (or set freeze_pretrained false to "
                         f"train it from scratch). {WEIGHTS_NOTE}")
    if arch.freeze_pretrained and arch.llm_lora_r > 0 and not arch.llm_path:
        raise ValueError(f"{cfg.architecture}: freeze_pretrained keeps the LLM frozen (LoRA trains), but no "
                         f"config_overrides.llm_path gives its weights (or set freeze_pretrained false). "
                         f"{WEIGHTS_NOTE}")
    return dataclasses.replace(arch, **paths)


def train(cfg: TrainConfig, out_dir: str | Path, device: str = "cpu", resume: bool = False,
          ddp: bool = False) -> Path | None:
    """Train and export; returns the model card path (None on DDP ranks > 0)."""
    with runtime(device, ddp) as rt:
        return fit(cfg, build_task(cfg, out_dir, rt), out_dir, rt, resume)


def _check_same_size(cc_set: Dataset, cd_set: Dataset) -> None:
    """The ViT's position embedding fixes one image size: a D_cd of another size would fail mid-epoch."""
    if not len(cc_set) or not len(cd_set):
        return
    cc, cd = tuple(cc_set[0]["before"].shape[-2:]), tuple(cd_set[0]["before"].shape[-2:])
    if cc != cd:
        raise ValueError(f"data_cd pairs are {cd[1]}x{cd[0]} px but data pairs are {cc[1]}x{cc[0]} px; Semantic-CC "
                         f"trains at one image size: set data_cd.crop_size (LEVIR-CD) or data_cd.size to match")


def build_task(cfg: TrainConfig, out_dir: str | Path, rt: Runtime) -> Task:
    """Model, data, the three stages, validation and export of one run (what :func:`fit` trains)."""
    seed_everything(cfg.seed)
    d, dcd = cfg.data, cfg.data_cd
    if d.source == "levircd":
        raise ValueError("semantic-cc trains captions: LEVIR-CD has none (use levirmci, or levircc with pseudo-labels)"
                         "; LEVIR-CD goes into data_cd, the cd stage's own set")
    if dcd is not None and not has_masks(dcd):
        raise ValueError(f"data_cd ({dcd.source}) has no change masks to train the cd stage on: use levircd, "
                         f"levirmci, synthetic, or levircc with data_cd.pseudo_labels")
    if dcd is not None and not has_masks(d):
        raise ValueError(f"with data_cd, data ({d.source}) feeds the cc stage and the joint stage, which trains on "
                         f"pairs with both a mask and captions (the paper's D_cd-cc): give data masks (levirmci, "
                         f"or levircc with data.pseudo_labels)")
    if cfg.loss_weights:
        raise ValueError("semantic-cc: set Eq. 9's lambda with config_overrides.cd_loss_weight, not loss_weights")
    check_for_captions(d.augment, "semantic-cc")
    arch_cfg = architecture_config(cfg)  # before any data is read: a missing weights path fails at once
    if d.augment.geometric and rt.main:
        log.warning("data.augment.geometric flips/rotates pairs whose captions name positions (left/top/...)")
    if not has_masks(d) and rt.main:
        log.warning("LEVIR-CC without data.pseudo_labels: no change masks, the cd stage has nothing to learn")
    train_set = build_dataset(d, d.train_split, train=True, progress=rt.main)
    val_set = build_dataset(d, d.val_split, progress=rt.main)
    cd_train = build_dataset(dcd, dcd.train_split, train=True, progress=rt.main) if dcd is not None else None
    cd_val = build_dataset(dcd, dcd.val_split, progress=rt.main) if dcd is not None else None
    if cd_train is not None:
        _check_same_size(train_set, cd_train)
    vocab = None if arch_cfg.llm_path else build_vocabulary(cfg, training_captions(train_set))
    spec = InputSpec(bands=3, tile_size=cfg.tile_size, gsd=cfg.gsd)
    model, arch_cfg = build_model(cfg.architecture, arch_cfg, input_spec=spec, vocabulary=vocab)
    model.load_pretrained()  # SAM's encoder and the Q-Former from the local checkpoints the config names
    if arch_cfg.freeze_pretrained and not arch_cfg.qformer_checkpoint:  # nothing pretrained to keep: it trains
        model.qformer.requires_grad_(True)
        model.query_tokens.requires_grad_(True)
        if rt.main:
            log.warning("no qformer_checkpoint: the Q-Former trains from scratch (the paper keeps MiniGPT-4's frozen)")
    module = StageForward(model)
    max_len = vocab.max_length if vocab is not None else arch_cfg.max_caption_length
    stages = semantic_cc_stages(model, spec, max_len, cd_train)

    def wrap(m: StageForward) -> TorchChangeModel:
        return TorchChangeModel(m.model, spec, vocab, name=cfg.model_name, version=cfg.model_version,
                                architecture=cfg.architecture)

    def validate(m: StageForward, device) -> dict[str, float]:
        model = wrap(m)
        metrics = evaluate(model, val_set, cfg.optim.batch_size, num_workers=cfg.optim.num_workers)
        if cd_val is None or len(cd_val) == 0:
            return metrics
        # two datasets: captions from D_cc's validation split, masks from D_cd's
        masks = evaluate(model, cd_val, cfg.optim.batch_size, num_workers=cfg.optim.num_workers)
        return {**{k: v for k, v in metrics.items() if k not in MASK_METRICS},
                **{k: v for k, v in masks.items() if k in MASK_METRICS}}

    def score(metrics: dict[str, float]) -> float:
        iou = metrics.get("IoU", 0.0)
        return (0.0 if math.isnan(iou) else iou) + metrics.get("BLEU-4", 0.0)

    def export(m: StageForward, metrics: dict[str, float], run: dict) -> Path:
        extra = {}
        if dcd is not None:
            extra = {"data_cd": dataclasses.asdict(dcd),
                     "training_data": f"cc + joint stages: {describe_data(d, len(train_set), len(val_set))}; "
                                      f"cd stage: {describe_data(dcd, len(cd_train), len(cd_val))}",
                     "split": f"captions: {describe_split(d, len(val_set))}; masks: {describe_split(dcd, len(cd_val))}"}
        return export_model_file(cfg, out_dir, m.model, arch_cfg, spec, vocab, metrics, run, len(train_set), val_set,
                                 **extra)

    trained = {p: sum(t.numel() for n, t in model.named_parameters() if t.requires_grad and n.startswith(pre))
               for p, pre in STAGE_PARTS.items()}
    run_info = {"stages": [s.name for s in stages], "cd_loss_weight": arch_cfg.cd_loss_weight,
                "train_pairs_per_stage": {s.name: len(s.train_set if s.train_set is not None else train_set)
                                          for s in stages},
                "trainable_parameters_per_stage": trained,
                "local_weights": {"sam_checkpoint": arch_cfg.sam_checkpoint, "llm_path": arch_cfg.llm_path,
                                  "qformer_checkpoint": arch_cfg.qformer_checkpoint}}
    return Task(module, train_set, val_set, stages[-1].loss, validate, score, export, loss_parts=LOSS_PARTS,
                val_columns=("IoU", "F1", "BLEU-4", "CIDEr-D"), extra_run_info=run_info, stages=stages)
