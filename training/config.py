"""Recipe configuration: one JSON file per run, read into plain dataclasses (one place for every knob).

Unknown keys are an error at every level, so a typo (``"learning_rate"``) fails before any work starts.
JSON has no comments: a config documents itself in an optional top-level ``"_comment"`` key (a string or a
list of strings), which is kept in the model card's recipe but otherwise ignored.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path


@dataclass
class AugmentConfig:
    """Bi-temporal augmentations (datasets/augment.py), applied to training pairs only."""

    # Flips and rot90, the SAME on both dates and the mask. Off for caption training by default: LEVIR-CC
    # captions say "on the left", "at the top", and a flipped image would contradict its caption.
    geometric: bool = False
    # Random resized crop (square, area fraction in crop_scale, resized back to the tile: bicubic images,
    # nearest mask), the SAME window on both dates and the mask. Caption recipes refuse it (it can cut away
    # the change a caption describes).
    crop: bool = False
    crop_scale: tuple[float, float] = (0.8, 1.0)
    # Gaussian blur of the images (never the mask), sigma uniform in blur_sigma px; BIT draws one sigma for
    # both dates (blur_per_date False), True draws one per date.
    blur: bool = False
    blur_sigma: tuple[float, float] = (0.0, 1.0)
    blur_per_date: bool = False
    # Independent brightness/contrast/saturation/hue jitter per date (acquisitions differ in light and season).
    photometric: bool = False
    brightness: float = 0.1
    contrast: float = 0.1
    saturation: float = 0.1
    hue: float = 0.02
    # Probability of swapping before/after. Change masks are symmetric, captions are not ("built" vs
    # "demolished"): recipes that train captions refuse a non-zero value.
    time_swap: float = 0.0


@dataclass
class DataConfig:
    # synthetic: training.synthetic; levircc: LEVIR-CC (masks from data.pseudo_labels, if given); levircd: LEVIR-CD
    # (crops of crop_size); levirmci: LEVIR-CC layout + images/<split>/label masks (also the annotation export);
    # multidate (sen-pretrain only): unlabelled co-registered tiles, ROOT/<place>/<date> (datasets/multidate.py).
    source: str = "synthetic"
    root: str | None = None            # dataset root for the real layouts
    captions: str | None = None        # levircc/levirmci caption JSON; default ROOT/LevirCCcaptions.json
    pseudo_labels: str | None = None   # levircc: folder written by the pseudo-labels step (<split>/<name>.png)
    crop_size: int | None = 256        # levircd: non-overlapping crops; None = whole images
    train_split: str = "train"
    val_split: str = "val"
    limit: int | None = None           # real data: at most this many pairs per split (smoke runs)
    val_limit: int | None = None       # real data: at most this many validation pairs (default: limit)
    missing: str = "error"             # levircc/levirmci: "skip" pairs of the caption file without images
    train_pairs: int = 2000            # synthetic only
    val_pairs: int = 200
    size: int = 256
    p_no_change: float = 0.3
    first_seed: int = 0
    # real-change (datasets/real_change.py): change synthesised on real imagery. ``labelled``: images whose
    # objects are pasted, [{"image": raster, "footprints": vector layer}]; ``backgrounds``: unlabelled real images
    # or folders; ``object_gsd_ratio``: the objects' GSD over the training GSD. train_pairs/val_pairs/size/
    # first_seed as for synthetic; ``generated_pairs`` generated scenes (training.synthetic) are mixed in for the
    # caption decoder, their masks ignored unless ``generated_masks``.
    labelled: list | None = None
    backgrounds: list | None = None
    object_gsd_ratio: float = 1.0
    generated_pairs: int = 0
    generated_masks: bool = False
    synthesis: dict = field(default_factory=dict)  # SynthesisConfig fields (pair-kind mix, nuisance strength)
    # real-change: real labelled pairs mixed in (folders in the LEVIR-CD layout A/ B/ label/, e.g. the analysts'
    # annotation export), drawn as random ``size`` crops with flips/rotations, each folder's pairs ``real_repeat``
    # times per epoch
    real_pairs: list | None = None
    real_repeat: int = 100
    augment: AugmentConfig = field(default_factory=AugmentConfig)


@dataclass
class VocabularyConfig:
    source: str = "levircc"            # levircc: the LEVIR-CC train captions; data: the training captions
    path: str | None = None            # levircc_captions.json or LevirCCcaptions.json (default: data.captions)
    min_count: int = 5
    max_length: int = 40


@dataclass
class OptimConfig:
    optimizer: str = "adam"            # adam | adamw | sgd
    lr: float = 1e-4                   # Adam (Pix4Cap); RSICCformer lineage uses 1e-4
    momentum: float = 0.9              # sgd only
    weight_decay: float = 0.0
    scheduler: str = "none"            # none | linear (to 0 at the last step) | cosine | plateau (below)
    warmup_steps: int = 0
    # plateau: after every validation, lr x plateau_factor once plateau_patience epochs in a row have brought no
    # new best plateau_metric (a validation metric; None = the recipe's score), higher is better with mode "max"
    plateau_factor: float = 0.7
    plateau_patience: int = 3
    plateau_metric: str | None = None
    plateau_mode: str = "max"
    # the optimiser groups the plateau decays (names from the recipe's Task.param_group; None = every group):
    # SEN decays its caption decoder's rate only
    plateau_groups: list[str] | None = None
    batch_size: int = 32               # per process; the effective batch is batch_size x accumulate x processes
    accumulate: int = 1                # gradient accumulation: optimizer step every N batches
    epochs: int = 40
    max_steps: int | None = None       # stop early (CPU smoke runs); counts optimizer steps
    grad_clip: float | None = 5.0
    num_workers: int = 0
    # auto (CUDA: bf16 where supported, else fp16 + GradScaler; always off on the CPU) | off | bf16 | fp16
    amp: str = "auto"


@dataclass
class LogConfig:
    tensorboard: bool = True           # OUT/tensorboard, when torch.utils.tensorboard imports
    plot: bool = True                  # OUT/curves.png after every epoch (matplotlib, Agg)
    every_steps: int = 10              # TensorBoard train scalars every N optimizer steps


@dataclass
class TextEncoderConfig:
    """dfm: TGCL's frozen sentence encoder, read from LOCAL files only (training/sentence_encoder.py)."""

    path: str | None = None            # sentence-transformers model folder, or "pkg:NAME/SUBDIR" inside a package
    max_length: int | None = None      # tokens; None = the folder's sentence_bert_config.json (else 128)
    batch_size: int = 256              # captions per encoder call when filling the embedding cache


@dataclass
class ContrastiveConfig:
    """sen-pretrain: MoCo-v2 on 6-band bi-temporal stacks (training/contrastive.py, datasets/multidate.py)."""

    dim: int = 128                     # projection output (MoCo-v2)
    queue_size: int = 65536            # K negatives (MoCo-v2)
    momentum: float = 0.999            # key encoder m (MoCo-v2)
    temperature: float = 0.2           # tau (MoCo-v2, SSL4EO-S12)
    bn_groups: int = 4                 # shuffle BN: groups per batch (SSL4EO-S12: 4 GPUs)
    strategy: str = "ordered"          # ordered: older date first, i <= j (SEN) | unordered
    season: str = "augment"            # augment: q and k draw their dates independently (SEN) | random: the same


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
    loss: str = "ce"                   # change-mask loss of bit-cd and pix4cap: ce | ce+dice
    loss_weights: dict = field(default_factory=dict)  # weights of a recipe's loss terms (dfm: caption, tgcl)
    cd_model: str | None = None        # dfm: a bit-cd model card; its BIT weights become DFM's CD encoder
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)  # dfm: TGCL's text side
    contrastive: ContrastiveConfig = field(default_factory=ContrastiveConfig)  # sen-pretrain: MoCo-v2
    backbone_init: str | None = None   # sen: the sen-pretrain backbone (.safetensors) the extractor starts from;
    #                                    pix4cap: "imagenet" (EfficientNet-Lite0 from its package) or a weights file
    init_from: str | None = None       # pix4cap: a model card of the same architecture and vocabulary to fine-tune
    pair_with: str | None = None       # sen: the change detector (model name or card) written into the card
    data: DataConfig = field(default_factory=DataConfig)
    # semantic-cc: the cd stage's own training/validation set (the paper's D_cd, LEVIR-CD); None = ``data``
    data_cd: DataConfig | None = None
    vocabulary: VocabularyConfig = field(default_factory=VocabularyConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    log: LogConfig = field(default_factory=LogConfig)
    training_data: str = ""            # free text for the model card
    licence: str = "GPL-2.0-or-later"
    # one line for the card and the dock's summary: the terms the training data puts on the weights
    # (e.g. "research use only: trained on research-licensed imagery"); empty = nothing beyond ``licence``
    weights_terms: str = ""
    _comment: str | list | None = None  # documentation inside the JSON file

    def to_dict(self) -> dict:
        return asdict(self)


def _build(cls, d: dict):
    known = {f.name: f for f in fields(cls)}
    unknown = set(d) - set(known)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} keys: {sorted(unknown)}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for k, v in d.items():
        sub = hints.get(k)
        optional = [a for a in typing.get_args(sub) if a is not type(None)]
        if v is not None and len(optional) == 1 and dataclasses.is_dataclass(optional[0]):
            sub = optional[0]  # an optional section (data_cd) given in the file
        if dataclasses.is_dataclass(sub):
            if not isinstance(v, dict):
                raise ValueError(f"{cls.__name__}.{k} must be an object, got {v!r}")
            kwargs[k] = _build(sub, v)
        else:
            kwargs[k] = v
    return cls(**kwargs)


def config_from_dict(d: dict) -> TrainConfig:
    """A :class:`TrainConfig` from a plain dict (a model card's ``recipe``, a JSON file)."""
    return _build(TrainConfig, d)


def load_config(path: str | Path, overrides: dict | None = None) -> TrainConfig:
    """Read a JSON recipe config; ``overrides`` (dotted keys) win, e.g. {"optim.max_steps": 2}.

    Relative dataset and vocabulary paths are resolved against the config file's folder when they exist
    there, else against the current directory (so shipped configs work from any working directory).
    """
    path = Path(path)
    d = json.loads(path.read_text())
    for key, value in (overrides or {}).items():
        node = d
        *parents, leaf = key.split(".")
        for p in parents:
            if node.get(p) is None:  # absent, or an optional section set to null
                node[p] = {}
            node = node[p]
        node[leaf] = value
    cfg = _build(TrainConfig, d)
    base = path.resolve().parent
    data_cd = [(cfg.data_cd, a) for a in ("root", "captions", "pseudo_labels")] if cfg.data_cd else []
    for obj, attr in (*data_cd, (cfg.data, "root"), (cfg.data, "captions"), (cfg.data, "pseudo_labels"),
                      (cfg.vocabulary, "path"), (cfg, "cd_model"), (cfg.text_encoder, "path"),
                      (cfg, "backbone_init"), (cfg, "pair_with")):
        value = getattr(obj, attr)
        setattr(obj, attr, _resolve(value, base))
    d = cfg.data
    d.backgrounds = [_resolve(v, base) for v in d.backgrounds] if d.backgrounds else d.backgrounds
    d.real_pairs = [_resolve(v, base) for v in d.real_pairs] if d.real_pairs else d.real_pairs
    cfg.init_from = _resolve(cfg.init_from, base)
    d.labelled = ([{k: _resolve(v, base) for k, v in item.items()} for item in d.labelled] if d.labelled
                  else d.labelled)
    return cfg


def _resolve(value, base: Path):
    """A relative path that exists beside the config file, made absolute; anything else as it is."""
    if value and not Path(value).is_absolute() and not Path(value).exists() and (base / value).exists():
        return str((base / value).resolve())
    return value
