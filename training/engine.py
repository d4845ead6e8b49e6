"""The training loop every recipe shares: seeds, logging, checkpoints, resume, AMP, accumulation, DDP, export.

A recipe builds its module, datasets, loss and validation and hands them over as a :class:`Task`; :func:`fit`
does the rest:

* **Determinism.** Everything is seeded from ``cfg.seed`` at the start, and again at the start of every
  epoch from ``(seed, epoch, rank)`` (python, numpy, torch: dropout, augmentations, caption choice); the
  shuffling order is a function of ``(seed, epoch)`` (a :class:`DistributedSampler`, also with one process).
  Hence an epoch's result depends only on the weights and optimiser state it starts from, and a run resumed
  from ``last.pt`` continues exactly as the uninterrupted run would have (tested on the CPU).
* **Logs** (rank 0 only): a tqdm bar; ``log.csv`` (one row per epoch: losses, validation metrics, lr, seconds);
  TensorBoard under ``tensorboard/`` when ``torch.utils.tensorboard`` imports (silently skipped otherwise);
  ``curves.png``, the loss and metric curves, redrawn after every epoch (matplotlib's Agg canvas, no pyplot).
* **Checkpoints** (rank 0 only): ``last.pt`` (weights, optimiser, scheduler, grad scaler, epoch, step, best
  score) after every epoch, written atomically; ``best.pt`` (weights) whenever the validation score improves.
  Both are plain ``torch.save`` of state dicts and are read back with ``weights_only=True``. Checkpoints stay
  in the run folder: what is shared is the exported model file (safetensors + card).
* **Gradient accumulation** (``optim.accumulate``): one optimiser step per N batches; under DDP the
  gradient all-reduce runs only on the step's last batch (``no_sync``).
* **Mixed precision** (``optim.amp``): on CUDA, bf16 autocast where the GPU supports bf16, else fp16 autocast
  with a GradScaler; always off on the CPU.
* **Multi-GPU with one flag.** ``python -m changescribe.training RECIPE ... --ddp`` relaunches itself under
  ``torchrun --standalone --nproc_per_node N`` (N = the visible GPUs, or ``--nproc``); running under
  ``torchrun`` yourself works the same. Each process trains on its :class:`DistributedSampler` shard with
  plain :class:`~torch.nn.parallel.DistributedDataParallel` (NCCL on CUDA, gloo on the CPU); rank 0 alone
  validates, logs, checkpoints and exports. ``optim.batch_size`` is per process.
* **Export.** At the end the best epoch's weights go to a ChangeScribe model file
  (:func:`changescribe.core.model_file.save_model_file`) whose card carries the validation metrics, the data,
  the full recipe config, and the run (git revision, epochs, steps, processes, device, AMP, torch version).

Why plain DDP and not PyTorch Lightning (or Accelerate): the loop above is about 300 lines that we read and
test in full, and it needs nothing beyond torch. Lightning would bring a second framework with its own
callbacks, checkpoint format (pickled ``.ckpt`` files, which model files refuse on purpose) and logger
plumbing, a dependency the GPU box and CI must install and pin against torch, and behaviour we would have to
learn to keep the resume and export guarantees. What Lightning would add here (multi-node launch, TPU,
FSDP/DeepSpeed strategies) none of ChangeScribe's models needs. training/ must also stay free of QGIS and of
anything heavy beyond torch, so that it runs on a headless GPU server.
"""

from __future__ import annotations

import dataclasses

import contextlib
import csv
import datetime
import logging
import math
import os
import random
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler
from tqdm import tqdm

from changescribe.core.checkpoints import load_torch_file

from .config import OptimConfig, TrainConfig
from .datasets.common import collate as default_collate

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent


# ---- seeds ---------------------------------------------------------------------------------------------------
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def epoch_seed(seed: int, epoch: int, rank: int = 0) -> int:
    """A well-mixed seed for one (run seed, epoch, process)."""
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0])


# ---- processes -----------------------------------------------------------------------------------------------
@dataclass
class Runtime:
    """Where this process trains: its device and its place among the DDP processes (1 without DDP)."""

    device: torch.device
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1 or torch.distributed.is_initialized()

    def barrier(self) -> None:
        if torch.distributed.is_initialized():
            torch.distributed.barrier()


def under_torchrun() -> bool:
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


@contextlib.contextmanager
def runtime(device: str | torch.device = "cpu", ddp: bool = False) -> Iterator[Runtime]:
    """The process's :class:`Runtime`; with ``ddp`` joins the torchrun process group (and leaves it after)."""
    device = torch.device(device)
    if not ddp:
        yield Runtime(device)
        return
    if not under_torchrun():
        raise RuntimeError("DDP needs the torchrun environment (RANK, WORLD_SIZE, LOCAL_RANK): run "
                           "`python -m changescribe.training RECIPE ... --ddp`, which starts torchrun itself")
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        backend = "gloo"
    # rank 0 validates while the others wait at a barrier: allow long validations
    torch.distributed.init_process_group(backend, timeout=datetime.timedelta(hours=2))
    try:
        yield Runtime(device, rank, world, local)
    finally:
        torch.distributed.destroy_process_group()


# ---- what a recipe provides --------------------------------------------------------------------------------
LossFn = Callable[[nn.Module, dict, torch.device], tuple[torch.Tensor, dict[str, float]]]


@dataclass(frozen=True)
class Stage:
    """One pass over a training set inside an epoch, with its own loss; only the parameters that
    ``trainable(name)`` selects (names in the task's module; None = all) and that required grad when
    :func:`fit` began get gradients. ``train_set`` is the stage's own data (None = the task's): a stage
    whose labels live in another dataset (Semantic-CC: change detection on LEVIR-CD, captions on LEVIR-CC)
    passes over that one. Semantic-CC's three-stage strategy is a tuple of these."""

    name: str
    loss: LossFn
    trainable: Callable[[str], bool] | None = None
    train_set: Dataset | None = None


@dataclass
class Task:
    """A recipe's part of a run.

    ``loss(model, batch, device) -> (loss, {part: float})`` runs inside autocast on the (possibly DDP-wrapped)
    model; ``validate(module, device) -> metrics`` and ``export(module, best_metrics, run) -> card path`` run on
    rank 0 with the bare module; ``score(metrics)`` is higher-is-better (NaN never wins). With ``stages``,
    every epoch runs them in turn instead of ``loss`` (one optimiser and one schedule over all of them: a
    parameter frozen in a stage has no gradient there, so the optimiser leaves it alone).
    """

    module: nn.Module
    train_set: Dataset
    val_set: Dataset | None
    loss: Callable[[nn.Module, dict, torch.device], tuple[torch.Tensor, dict[str, float]]]
    validate: Callable[[nn.Module, torch.device], dict[str, float]]
    score: Callable[[dict[str, float]], float]
    export: Callable[[nn.Module, dict[str, float], dict[str, Any]], Path]
    loss_parts: tuple[str, ...] = ()
    val_columns: tuple[str, ...] = ()
    collate: Callable[[list[dict]], dict] = default_collate
    find_unused_parameters: bool = False
    extra_run_info: dict[str, Any] = field(default_factory=dict)
    stages: tuple[Stage, ...] = ()
    # names each parameter's optimiser group (by its name in ``module``), so settings such as
    # ``optim.plateau_groups`` can address part of the model (SEN: "encoder" / "decoder"); None = one group
    param_group: Callable[[str], str] | None = None


# ---- optimiser, schedule, precision ----------------------------------------------------------------------------
def parameter_groups(module: nn.Module, group_of: Callable[[str], str] | None) -> list[dict[str, Any]]:
    """The trainable parameters as named optimiser groups (in first-seen order); one unnamed group without
    ``group_of``. The names travel in the optimiser's state, so a resumed run finds the same groups."""
    if group_of is None:
        return [{"params": [p for p in module.parameters() if p.requires_grad]}]
    groups: dict[str, list[nn.Parameter]] = {}
    for name, p in module.named_parameters():
        if p.requires_grad:
            groups.setdefault(group_of(name), []).append(p)
    return [{"params": ps, "name": g} for g, ps in groups.items()]


def build_optimizer(params, o: OptimConfig) -> torch.optim.Optimizer:
    if o.optimizer == "adam":
        return torch.optim.Adam(params, lr=o.lr, weight_decay=o.weight_decay)
    if o.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay)
    if o.optimizer == "sgd":
        return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    raise ValueError(f"unknown optim.optimizer {o.optimizer!r}; use adam, adamw or sgd")


def build_scheduler(opt: torch.optim.Optimizer, o: OptimConfig, total_steps: int):
    """Per optimiser step: ``linear`` decays to 0 at ``total_steps`` (BIT), ``cosine`` likewise; both after
    ``warmup_steps`` of linear warm-up. Per epoch: ``plateau`` multiplies the lr by ``plateau_factor`` once
    ``plateau_patience`` validations in a row have brought no new best (SEN: BLEU-4, x 0.7 after 3 epochs)."""
    if o.scheduler == "none":
        return None
    if o.scheduler == "plateau":
        if o.warmup_steps:
            raise ValueError("optim.warmup_steps does not combine with optim.scheduler 'plateau'")
        if o.plateau_mode not in ("max", "min") or o.plateau_patience < 1 or not 0 < o.plateau_factor < 1:
            raise ValueError("plateau: optim.plateau_mode must be max or min, plateau_patience >= 1 and "
                             "0 < plateau_factor < 1")
        # torch's patience counts the epochs it tolerates: ours counts the one that decays too; threshold 0:
        # any gain is a new best. A group outside plateau_groups gets its own lr as its floor: it never decays.
        return torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode=o.plateau_mode, factor=o.plateau_factor,
                                                          patience=o.plateau_patience - 1, threshold=0.0,
                                                          min_lr=_plateau_floors(opt, o))
    if o.scheduler not in ("linear", "cosine"):
        raise ValueError(f"unknown optim.scheduler {o.scheduler!r}; use none, linear, cosine or plateau")
    warm, total = max(0, o.warmup_steps), max(1, total_steps)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        t = min(1.0, (step - warm) / max(1, total - warm))
        return 1.0 - t if o.scheduler == "linear" else 0.5 * (1.0 + math.cos(math.pi * t))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def _plateau_floors(opt: torch.optim.Optimizer, o: OptimConfig) -> list[float]:
    names = [g.get("name") for g in opt.param_groups]
    if o.plateau_groups is None:
        return [0.0] * len(names)
    unknown = sorted(set(o.plateau_groups) - set(names))
    if unknown:
        raise ValueError(f"optim.plateau_groups {unknown} name no optimiser group; this recipe's groups: "
                         f"{[n for n in names if n] or 'one unnamed group'}")
    return [0.0 if g.get("name") in o.plateau_groups else g["lr"] for g in opt.param_groups]


def shown_lr(opt: torch.optim.Optimizer, o: OptimConfig) -> float:
    """The lr the logs show: the first decayed group's when only some groups decay, else the first group's."""
    for g in opt.param_groups:
        if o.plateau_groups is None or g.get("name") in o.plateau_groups:
            return g["lr"]
    return opt.param_groups[0]["lr"]


def amp_dtype(mode: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``optim.amp`` on this device; None = full precision (always on the CPU)."""
    if mode not in ("auto", "off", "bf16", "fp16"):
        raise ValueError(f"unknown optim.amp {mode!r}; use auto, off, bf16 or fp16")
    if device.type != "cuda" or mode == "off":
        return None
    if mode == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if mode == "bf16" else torch.float16


# ---- run facts ------------------------------------------------------------------------------------------------
def git_revision(repo: Path = REPO) -> tuple[str, bool | None]:
    """(``git rev-parse --short HEAD`` or "unknown", whether tracked files differ from it)."""
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo, capture_output=True, text=True,
                             timeout=20)
        if rev.returncode != 0 or not rev.stdout.strip():
            return "unknown", None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                               capture_output=True, text=True, timeout=20)
        return rev.stdout.strip(), (bool(dirty.stdout.strip()) if dirty.returncode == 0 else None)
    except (OSError, subprocess.SubprocessError):
        return "unknown", None


# ---- logging --------------------------------------------------------------------------------------------------
class RunLog:
    """log.csv + TensorBoard + curves.png of one run folder (rank 0)."""

    def __init__(self, out: Path, columns: list[str], cfg: TrainConfig, resume_epoch: int, resume_step: int):
        self.out, self.columns, self.cfg = out, columns, cfg
        self.path = out / "log.csv"
        rows = self.rows() if self.path.exists() else []
        if rows and list(rows[0]) != columns:
            raise ValueError(f"{self.path} has other columns than this recipe logs; use a new --out folder")
        # a resumed run drops rows of epochs after its checkpoint (written before an interruption)
        keep = [r for r in rows if int(r["epoch"]) <= resume_epoch]
        with self.path.open("w", newline="") as f:
            w = csv.DictWriter(f, columns)
            w.writeheader()
            w.writerows(keep)
        self.tb = None
        if cfg.log.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out / "tensorboard"), purge_step=resume_step or None)
            except Exception:  # noqa: BLE001 - tensorboard missing or broken: CSV and PNG still log the run
                self.tb = None

    def rows(self) -> list[dict]:
        with self.path.open(newline="") as f:
            return list(csv.DictReader(f))

    def scalar(self, tag: str, value: float, step: int) -> None:
        if self.tb is not None and math.isfinite(value):
            self.tb.add_scalar(tag, value, step)

    def epoch(self, row: dict) -> None:
        with self.path.open("a", newline="") as f:
            csv.DictWriter(f, self.columns).writerow(row)
        for k, v in row.items():
            if k.startswith("val_") and isinstance(v, float):
                self.scalar(f"val/{k[4:]}", v, int(row["epoch"]))
        if self.tb is not None:
            self.tb.flush()
        if self.cfg.log.plot:
            self.plot()

    def plot(self) -> None:
        try:
            from matplotlib.backends.backend_agg import FigureCanvasAgg
            from matplotlib.figure import Figure
        except ImportError:
            return
        rows = self.rows()
        if not rows:
            return
        x = [int(r["epoch"]) for r in rows]

        def series(col: str) -> list[float]:
            return [float(r[col]) if r[col] not in ("", "nan") else float("nan") for r in rows]

        losses = [c for c in self.columns if c.startswith("loss")]
        metrics = [c for c in self.columns if c.startswith("val_")]
        fig = Figure(figsize=(10, 4), dpi=100)
        FigureCanvasAgg(fig)
        for i, (cols, title) in enumerate(((losses, "training loss"), (metrics, "validation"))):
            ax = fig.add_subplot(1, 2, i + 1)
            for c in cols:
                ax.plot(x, series(c), marker="o", label=c)
            ax.set_title(title)
            ax.set_xlabel("epoch")
            ax.grid(alpha=0.3)
            if cols:
                ax.legend(fontsize=8)
        fig.suptitle(f"{self.cfg.recipe}: {self.cfg.model_name} ({self.cfg.architecture})")
        fig.tight_layout()
        tmp = self.out / "curves.tmp.png"
        fig.savefig(tmp)
        tmp.replace(self.out / "curves.png")

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()



def export_model_file(cfg: TrainConfig, out_dir: str | Path, module, arch_cfg, spec, vocabulary, metrics: dict,
                      run: dict, n_train: int, val_set, **card_fields: Any) -> Path:
    """The best weights as a model file whose card says what data, split and recipe produced them.
    ``card_fields`` go into the card as they are (SEN: ``pair_with``); ``training_data`` and ``split`` replace
    the descriptions of ``cfg.data`` (Semantic-CC's second dataset); ``cfg.training_data`` still wins."""
    from changescribe.core.model_file import save_model_file

    from .datasets import describe_data, describe_split

    d = cfg.data
    split = card_fields.pop("split", None) or describe_split(d, len(val_set))
    described = card_fields.pop("training_data", None) or describe_data(d, n_train, len(val_set))
    return save_model_file(
        Path(out_dir) / cfg.model_name, module, cfg.architecture, arch_cfg, spec, vocabulary, name=cfg.model_name,
        version=cfg.model_version, licence=cfg.licence, training_data=cfg.training_data or described,
        metrics={"split": split, **{k: round(v, 4) for k, v in metrics.items()}},
        recipe=cfg.to_dict(), data=dataclasses.asdict(d), training=run,
        **({"weights_terms": cfg.weights_terms} if cfg.weights_terms else {}), **card_fields)


Feed = tuple[DataLoader, DistributedSampler, int]  # a stage's loader, its sampler, its batches per epoch


def _stage_feeds(stages: tuple[Stage, ...], task: Task, cfg: TrainConfig, rt: Runtime, accumulate: int) -> list[Feed]:
    """One sharded, shuffled loader per distinct training set (stages sharing a set share it), and each
    stage's batches per epoch: whole optimiser steps, so accumulation never spans two stages."""
    o = cfg.optim
    shared: dict[int, tuple[DataLoader, DistributedSampler]] = {}
    feeds = []
    for stage in stages:
        data = stage.train_set if stage.train_set is not None else task.train_set
        where = f"stage {stage.name!r}: " if len(stages) > 1 else ""
        if id(data) not in shared:
            if len(data) < o.batch_size * rt.world_size:
                raise ValueError(f"{where}{len(data)} training pairs are fewer than one batch "
                                 f"({o.batch_size} x {rt.world_size} processes)")
            sampler = DistributedSampler(data, num_replicas=rt.world_size, rank=rt.rank, shuffle=True,
                                         seed=cfg.seed, drop_last=True)
            shared[id(data)] = (DataLoader(data, batch_size=o.batch_size, sampler=sampler, drop_last=True,
                                           collate_fn=task.collate, num_workers=o.num_workers,
                                           pin_memory=rt.device.type == "cuda",
                                           persistent_workers=o.num_workers > 0), sampler)
        loader, sampler = shared[id(data)]
        if len(loader) < accumulate:
            raise ValueError(f"{where}an epoch has {len(loader)} batches, fewer than optim.accumulate={accumulate}")
        feeds.append((loader, sampler, len(loader) // accumulate * accumulate))
    return feeds


def _stage_batches(stages: tuple[Stage, ...], feeds: list[Feed], module: nn.Module, trainable: dict[str, bool],
                   epoch: int) -> Iterator[tuple[Stage, dict]]:
    """Each stage's pass over its training set in turn (its own shuffle), with its parameters trainable.
    One stage shuffles exactly as a plain epoch does (sampler epoch = ``epoch``)."""
    for s, (stage, (loader, sampler, usable)) in enumerate(zip(stages, feeds)):
        sampler.set_epoch(epoch * len(stages) + s)
        for name, p in module.named_parameters():
            p.requires_grad_(trainable[name] and (stage.trainable is None or stage.trainable(name)))
        for i, batch in enumerate(loader):
            if i >= usable:
                break
            yield stage, batch


def _plateau_value(o: OptimConfig, metrics: dict[str, float], score: float) -> float:
    """What the plateau scheduler watches this epoch: ``optim.plateau_metric`` or the task's score."""
    if not o.plateau_metric:
        return score
    if metrics and o.plateau_metric not in metrics:
        raise ValueError(f"optim.plateau_metric {o.plateau_metric!r} is not among the validation metrics "
                         f"{sorted(metrics)}")
    return float(metrics.get(o.plateau_metric, float("nan")))


def _plateau_step(sched, value: float, rt: Runtime) -> None:
    """One plateau decision per epoch on rank 0's validation value, shared so every process keeps one lr.
    NaN (nothing validated) counts as an epoch without a new best."""
    if torch.distributed.is_initialized():
        t = torch.tensor([value], dtype=torch.float64, device=rt.device)
        torch.distributed.broadcast(t, 0)
        value = float(t)
    before = [g["lr"] for g in sched.optimizer.param_groups]
    sched.step(value)
    after = [g["lr"] for g in sched.optimizer.param_groups]
    if rt.main and after != before:
        names = [g.get("name") or str(i) for i, g in enumerate(sched.optimizer.param_groups)]
        log.info("plateau: no new best for %d epochs, lr x %g: %s", sched.patience + 1, sched.factor,
                 ", ".join(f"{n} {a:g}" for n, a, b in zip(names, after, before) if a != b))


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)


def _fmt(v: float) -> float | str:
    return round(v, 5) if math.isfinite(v) else "nan"


# ---- the loop -------------------------------------------------------------------------------------------------
def fit(cfg: TrainConfig, task: Task, out_dir: str | Path, rt: Runtime | None = None,
        resume: bool = False) -> Path | None:
    """Train ``task`` as ``cfg.optim`` says, then export the best epoch. Returns the card path (None on ranks > 0)."""
    rt = rt or Runtime(torch.device("cpu"))
    o = cfg.optim
    out = Path(out_dir)
    if rt.main:
        out.mkdir(parents=True, exist_ok=True)
    rt.barrier()
    device = rt.device
    module = task.module.to(device)
    accumulate = max(1, int(o.accumulate))
    stages = task.stages or (Stage("train", task.loss),)
    feeds = _stage_feeds(stages, task, cfg, rt, accumulate)
    steps_per_epoch = sum(usable for *_, usable in feeds) // accumulate  # all stages
    # the schedule spans the planned epochs (and stages); max_steps only stops early (as an interruption would)
    total_steps = steps_per_epoch * o.epochs
    trainable = {n: p.requires_grad for n, p in module.named_parameters()}

    opt = build_optimizer(parameter_groups(module, task.param_group), o)
    sched = build_scheduler(opt, o, total_steps)
    plateau = isinstance(sched, torch.optim.lr_scheduler.ReduceLROnPlateau)  # stepped per epoch, not per step
    dtype = amp_dtype(o.amp, device)
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None

    start_epoch, step, best, best_metrics, best_epoch = 0, 0, -math.inf, {}, 0
    ckpt = out / "last.pt"
    if resume and ckpt.exists():
        state = load_torch_file(ckpt, map_location=device)
        module.load_state_dict(state["model"])
        opt.load_state_dict(state["optim"])
        if sched is not None and state.get("scheduler"):
            sched.load_state_dict(state["scheduler"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        start_epoch, step = int(state["epoch"]) + 1, int(state["step"])
        best, best_epoch = float(state["best"]), int(state.get("best_epoch", 0))
        best_metrics = dict(state.get("best_metrics", {}))
        if rt.main:
            log.info("resumed from %s at epoch %d (step %d)", ckpt, start_epoch + 1, step)
    elif resume and rt.main:
        log.info("no checkpoint in %s: starting from scratch", out)

    model: nn.Module = module
    if rt.distributed:
        model = nn.parallel.DistributedDataParallel(
            module, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=task.find_unused_parameters or len(stages) > 1)

    columns = ["epoch", "step", "loss", *task.loss_parts, *[f"val_{c}" for c in task.val_columns], "lr", "seconds"]
    runlog = RunLog(out, columns, cfg, start_epoch, step) if rt.main else None
    autocast = (lambda: torch.autocast(device.type, dtype=dtype)) if dtype is not None else contextlib.nullcontext
    finished = bool(o.max_steps and step >= o.max_steps)
    epoch = start_epoch - 1
    try:
        for epoch in range(start_epoch, o.epochs):
            if finished:
                break
            seed_everything(epoch_seed(cfg.seed, epoch, rt.rank))
            model.train()
            t0 = time.perf_counter()
            sums: dict[str, float] = {}
            counts: dict[str, int] = {}
            batches = 0
            bar = tqdm(_stage_batches(stages, feeds, module, trainable, epoch),
                       total=steps_per_epoch * accumulate, desc=f"epoch {epoch + 1}/{o.epochs}", leave=False,
                       disable=not rt.main)
            for i, (stage, batch) in enumerate(bar):
                boundary = (i + 1) % accumulate == 0
                sync = model.no_sync() if (model is not module and not boundary) else contextlib.nullcontext()
                with sync:
                    with autocast():
                        loss, parts = stage.loss(model, batch, device)
                    scaled = loss / accumulate
                    (scaler.scale(scaled) if scaler is not None else scaled).backward()
                for k, v in {"loss": float(loss.detach()), **parts}.items():
                    sums[k] = sums.get(k, 0.0) + v
                    counts[k] = counts.get(k, 0) + 1
                batches += 1
                if not boundary:
                    continue
                if scaler is not None:
                    scaler.unscale_(opt)
                if o.grad_clip:
                    nn.utils.clip_grad_norm_(module.parameters(), o.grad_clip)
                if scaler is not None:
                    scaler.step(opt)
                    scaler.update()
                else:
                    opt.step()
                opt.zero_grad(set_to_none=True)
                if sched is not None and not plateau:
                    sched.step()
                step += 1
                if rt.main:
                    bar.set_postfix(loss=f"{sums['loss'] / batches:.3f}",
                                    **({"stage": stage.name} if len(stages) > 1 else {}))
                    if runlog is not None and step % max(1, cfg.log.every_steps) == 0:
                        runlog.scalar("train/loss", float(loss.detach()), step)
                        runlog.scalar("train/lr", shown_lr(opt, o), step)
                if o.max_steps and step >= o.max_steps:
                    finished = True
                    break
            bar.close()
            if rt.world_size > 1:
                print(f"[rank {rt.rank}/{rt.world_size}] epoch {epoch + 1}: {batches} batches, step {step}",
                      flush=True)
            if rt.main:
                has_val = task.val_set is not None and len(task.val_set) > 0
                metrics = task.validate(module, device) if has_val else {}
                score = task.score(metrics) if has_val else float(epoch)
                if not math.isfinite(score):
                    score = -math.inf
                means = {k: v / counts[k] for k, v in sums.items()}  # a stage's parts: over its batches
                row = {"epoch": epoch + 1, "step": step, "lr": _fmt(shown_lr(opt, o)),
                       "seconds": round(time.perf_counter() - t0, 1)}
                row.update({c: _fmt(means.get(c, float("nan"))) for c in ("loss", *task.loss_parts)})
                row.update({f"val_{c}": _fmt(float(metrics.get(c, float("nan")))) for c in task.val_columns})
                runlog.epoch(row)
                shown = "  ".join(f"{c} {metrics[c]:.3f}" for c in task.val_columns if c in metrics)
                print(f"epoch {epoch + 1}: loss {means.get('loss', float('nan')):.3f}  val {shown}", flush=True)
                if score > best or best_epoch == 0:
                    best, best_metrics, best_epoch = score, metrics, epoch + 1
                    _atomic_save(module.state_dict(), out / "best.pt")
                if plateau:
                    _plateau_step(sched, _plateau_value(o, metrics, score), rt)
                _atomic_save({"model": module.state_dict(), "optim": opt.state_dict(),
                              "scheduler": sched.state_dict() if sched is not None else {},
                              "scaler": scaler.state_dict() if scaler is not None else {},
                              "epoch": epoch, "step": step, "best": best, "best_epoch": best_epoch,
                              "best_metrics": {k: float(v) for k, v in best_metrics.items()},
                              "world_size": rt.world_size}, ckpt)
            elif plateau:
                _plateau_step(sched, float("nan"), rt)  # receives rank 0's value
            rt.barrier()
    finally:
        for name, p in module.named_parameters():
            p.requires_grad_(trainable[name])
        if runlog is not None:
            runlog.close()
    if rt.world_size > 1:
        print(f"[rank {rt.rank}/{rt.world_size}] finished: {step} optimizer steps", flush=True)
    if not rt.main:
        rt.barrier()
        return None
    if (out / "best.pt").exists():
        module.load_state_dict(load_torch_file(out / "best.pt", map_location=device))
    module.to("cpu").eval()
    revision, dirty = git_revision()
    run = {"git_revision": revision, "git_dirty": dirty, "epochs": epoch + 1, "steps": step,
           "best_epoch": best_epoch, "processes": rt.world_size, "device": device.type,
           "amp": str(dtype).replace("torch.", "") if dtype is not None else "off",
           "effective_batch_size": o.batch_size * accumulate * rt.world_size, "torch": torch.__version__,
           **task.extra_run_info}
    card = task.export(module, best_metrics, run)
    rt.barrier()
    return card
