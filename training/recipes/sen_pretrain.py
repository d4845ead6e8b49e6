"""sen-pretrain recipe: SEN stage 1, bi-temporal contrastive pre-training of the single-stream extractor.

SEN (seed paper 003, Sec. III-B, IV-A-1, IV-F-1) pre-trains its 6-band ResNet on unlabelled multi-date tiles with
MoCo-v2 (training/contrastive.py): a query and a key are two augmented 6-band stacks of the SAME place, each of two
dates drawn by the *ordered* strategy (older date first, ``i <= j``) with the dates of query and key drawn
independently ("season augment", Table VII); other places are the negatives (the queue). The stack puts the two
dates in the order the SEN architecture reads (``input_order``), so the stem sees in stage 2 what it learnt here;
the paper's text disagrees with itself (Sec. III-B: older first; Eq. 2: ``Concat(I_aft, I_bef)``), and what it asks
for is that both stages agree (Sec. III-B: "aligns with the bi-temporal images used in downstream RSICC tasks").

Defaults (``training/configs/sen_pretrain_ssl4eo.json``): SEN pre-trains on SSL4EO-S12's RGB bands (four seasons
per place) "following their experimental setup", for 300 epochs (Table VIII). SEN states no other value, so these
are SSL4EO-S12's MoCo-v2 run (its released pretrain_moco_v2_s2c script) and MoCo-v2's defaults: SGD momentum 0.9,
weight decay 1e-4, lr 0.03 for batch 256, cosine schedule; dim 128, queue 65,536, momentum 0.999, tau 0.2; 224 px
crops (area 0.2-1), brightness and contrast 0.4, flips. SEN's augmentation list ("random flipping, random
brightness, and random contrast") is that set's core. Not reproduced: SSL4EO's per-transform probabilities
(jitter 0.8, grey 0.2, blur 0.5) - the shared bi-temporal augmentation applies what it is given to every view -
and MoCo's cosine steps per epoch (here per optimiser step).

Output: ``OUT/<model_name>.safetensors``, the query extractor in torchvision's ResNet layout, its metadata saying
what it is (:data:`BACKBONE_FORMAT`, architecture, backbone, stem bands, input order, normalisation, the MoCo
settings, the data, the run); the ``sen`` recipe's ``backbone_init`` reads it. ``last.pt`` holds the whole MoCo
state (both encoders, the queue) for ``--resume``, as for every recipe. No validation: every epoch is "best".
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch

from changescribe.core.atomic import atomic_path
from changescribe.core.model_api import InputSpec, normalise
from changescribe.core.models.backbones import ResNetBackbone
from changescribe.core.models.registry import get_entry
from changescribe.core.models.sen import SEN, SENConfig

from ..config import TrainConfig
from ..contrastive import MoCo, backbone_state_dict, info_nce
from ..datasets.augment import BiTemporalAugment
from ..datasets.multidate import BiTemporalViews, build_places
from ..engine import Runtime, Task, fit, runtime, seed_everything

BACKBONE_FORMAT = "changescribe-sen-backbone/1"


def train(cfg: TrainConfig, out_dir: str | Path, device: str = "cpu", resume: bool = False,
          ddp: bool = False) -> Path | None:
    """Pre-train and write the backbone file; returns its path (None on DDP ranks > 0)."""
    with runtime(device, ddp) as rt:
        return _train(cfg, out_dir, rt, resume)


def sen_config(cfg: TrainConfig) -> SENConfig:
    """The SEN architecture of ``cfg`` (registry entry + ``config_overrides``); both stages build it alike."""
    entry = get_entry(cfg.architecture)
    if entry.builder is not SEN:
        raise ValueError(f"the SEN recipes train SEN architectures (sen, sen-small), not {cfg.architecture!r}")
    sen = dataclasses.replace(entry.config, **cfg.config_overrides)
    if sen.in_channels != 3:
        raise ValueError("SEN's pre-training reads RGB tiles: in_channels must be 3 (a 6-band stem)")
    return sen


def stack_dates(x: torch.Tensor, spec: InputSpec, input_order: str) -> torch.Tensor:
    """uint8 (B, 6, H, W), older date in bands 0-2 -> the normalised 6-band input in SEN's ``input_order``."""
    older, newer = normalise(x[:, :3].float(), spec), normalise(x[:, 3:].float(), spec)
    return torch.cat((newer, older) if input_order == "after_before" else (older, newer), 1)


def save_backbone(path: Path, backbone: ResNetBackbone, metadata: dict[str, Any]) -> Path:
    """The extractor as safetensors (torchvision key layout), ``metadata`` as JSON strings; written atomically."""
    from safetensors.torch import save_file

    meta = {"format": BACKBONE_FORMAT, **{k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}}
    with atomic_path(path) as tmp:
        save_file(backbone_state_dict(backbone), tmp, metadata=meta)
    return path


def read_backbone_metadata(path: str | Path) -> dict[str, Any] | None:
    """The metadata of a sen-pretrain file (JSON values decoded), or None for any other weights file (e.g. a
    torchvision ImageNet ResNet, which SEN's extractor also loads, its stem repeated for 6 bands)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        return None
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != BACKBONE_FORMAT:
        return None
    out: dict[str, Any] = {}
    for k, v in meta.items():
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return out


def _train(cfg: TrainConfig, out_dir: str | Path, rt: Runtime, resume: bool) -> Path | None:
    seed_everything(cfg.seed)
    sen = sen_config(cfg)
    c, d, o = cfg.contrastive, cfg.data, cfg.optim
    if o.batch_size % c.bn_groups:
        raise ValueError(f"optim.batch_size {o.batch_size} must be a multiple of contrastive.bn_groups {c.bn_groups}")
    if o.batch_size * rt.world_size > c.queue_size:
        raise ValueError(f"a step's {o.batch_size * rt.world_size} keys exceed contrastive.queue_size {c.queue_size}")
    places = build_places(d, progress=rt.main)
    views = BiTemporalViews(places, d.size, BiTemporalAugment(d.augment), c.strategy, c.season)
    spec = InputSpec(bands=sen.in_channels, tile_size=d.size, gsd=cfg.gsd)
    # the extractor exactly as SEN builds it (core/models/sen.py): 2 x in_channels bands, stride 32
    backbone = ResNetBackbone(sen.backbone, 2 * sen.in_channels, sen.backbone_stages, 32)
    moco = MoCo(backbone, c.dim, c.queue_size, c.momentum, c.temperature, c.bn_groups)

    def loss(model, batch: dict, device: torch.device):
        q = stack_dates(batch["query"].to(device), spec, sen.input_order)
        k = stack_dates(batch["key"].to(device), spec, sen.input_order)
        logits = model(q, k)
        acc = (logits.detach().argmax(1) == 0).float().mean()  # how often the own key wins (MoCo's acc@1)
        return info_nce(logits), {"acc1": float(acc)}

    def export(module: MoCo, metrics: dict[str, float], run: dict) -> Path:
        meta = {"architecture": cfg.architecture, "backbone": sen.backbone, "backbone_stages": sen.backbone_stages,
                "in_channels": 2 * sen.in_channels, "input_order": sen.input_order, "mean": list(spec.mean),
                "std": list(spec.std), "size": d.size, "gsd": cfg.gsd, "name": cfg.model_name,
                "version": cfg.model_version, "contrastive": dataclasses.asdict(c),
                "data": {"source": d.source, "root": d.root, "places": len(places)}, "training": run}
        return save_backbone(Path(out_dir) / f"{cfg.model_name}.safetensors", module.encoder_q.backbone, meta)

    task = Task(moco, views, None, loss, validate=lambda module, device: {}, score=lambda metrics: 0.0,
                export=export, loss_parts=("acc1",),
                extra_run_info={"method": "MoCo-v2, bi-temporal 6-band stacks (SEN Sec. III-B)"})
    return fit(cfg, task, out_dir, rt, resume)
