"""Pix4Cap recipe: joint change-mask + caption training, L_total = L_det + L_cap (Eq. 7–9), Adam.

On LEVIR-CC the masks are CD pseudo-labels from a trained change detector (a separate step of the training
issue); on synthetic data they are the generator's true masks. The best epoch (validation IoU + BLEU-4) is
exported to a model file the plugin loads.
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import random
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from changescribe.core.model_api import InputSpec, normalise
from changescribe.core.model_file import save_model_file
from changescribe.core.models.adapter import TorchChangeModel
from changescribe.core.models.registry import build_model, get_entry
from changescribe.core.vocabulary import Vocabulary

from ..config import TrainConfig
from ..datasets.synthetic import SyntheticChangeDataset
from ..losses import pix4cap_loss
from ..metrics import MaskScores, caption_scores

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _collate(items: list[dict]) -> dict:
    return {"before": torch.stack([i["before"] for i in items]), "after": torch.stack([i["after"] for i in items]),
            "mask": torch.stack([i["mask"] for i in items]), "captions": [i["captions"] for i in items]}


def build_vocabulary(cfg: TrainConfig, train_captions: list[list[str]]) -> Vocabulary:
    v = cfg.vocabulary
    if v.source == "levircc" and v.path and Path(v.path).is_file():
        return Vocabulary.from_levircc(v.path)
    if v.source == "levircc":
        log.warning("LEVIR-CC captions not found at %s; building the vocabulary from the training captions", v.path)
    return Vocabulary.build([c for caps in train_captions for c in caps], min_count=v.min_count,
                            max_length=v.max_length)


def evaluate(model: TorchChangeModel, data: SyntheticChangeDataset, batch_size: int,
             meteor: bool = False, beam_size: int = 1) -> dict[str, float]:
    """Mask metrics over all pixels and caption metrics against all five references."""
    scores = MaskScores()
    hyps: list[str] = []
    loader = DataLoader(data, batch_size=batch_size, collate_fn=_collate)
    for batch in loader:
        pred = model.predict(batch["before"].float().to(model.device), batch["after"].float().to(model.device),
                             with_captions=True, beam_size=beam_size)
        scores.update(pred.probability, batch["mask"])
        hyps += pred.captions
    out = scores.compute()
    out.update(caption_scores(data.captions, hyps, meteor=meteor))
    return out


def train(cfg: TrainConfig, out_dir: str | Path, device: str = "cpu", resume: bool = False) -> Path:
    """Train and export; returns the model card path. Checkpoints go to ``out_dir/last.pt`` every epoch."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.seed)
    d = cfg.data
    if d.source != "synthetic":
        raise NotImplementedError(f"data source {d.source!r}: the LEVIR readers come with the training issue")
    train_set = SyntheticChangeDataset(d.train_pairs, d.size, d.first_seed, d.p_no_change)
    val_set = SyntheticChangeDataset(d.val_pairs, d.size, d.first_seed + 1_000_000, d.p_no_change)
    vocab = build_vocabulary(cfg, train_set.captions)
    spec = InputSpec(bands=3, tile_size=cfg.tile_size, gsd=cfg.gsd)
    arch_cfg = dataclasses.replace(get_entry(cfg.architecture).config, **cfg.config_overrides)
    module, arch_cfg = build_model(cfg.architecture, arch_cfg, input_spec=spec, vocabulary=vocab)
    module.to(device)
    opt = torch.optim.Adam(module.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    start_epoch, step, best = 0, 0, -1.0
    ckpt = out / "last.pt"
    if resume and ckpt.exists():
        state = torch.load(ckpt, map_location=device, weights_only=True)
        module.load_state_dict(state["model"])
        opt.load_state_dict(state["optim"])
        start_epoch, step, best = int(state["epoch"]) + 1, int(state["step"]), float(state["best"])
        log.info("resumed from %s at epoch %d", ckpt, start_epoch)
    gen = torch.Generator().manual_seed(cfg.seed)
    loader = DataLoader(train_set, batch_size=cfg.optim.batch_size, shuffle=True, drop_last=True, generator=gen,
                        collate_fn=_collate, num_workers=cfg.optim.num_workers)
    rng = random.Random(cfg.seed)
    log_path = out / "log.csv"
    best_metrics: dict = {}
    with log_path.open("a", newline="") as log_file:
        writer = csv.writer(log_file)
        if log_path.stat().st_size == 0:
            writer.writerow(["epoch", "step", "loss", "loss_det", "loss_cap", "val_IoU", "val_F1", "val_BLEU-4",
                             "val_CIDEr-D", "seconds"])
        for epoch in range(start_epoch, cfg.optim.epochs):
            module.train()
            t0 = time.perf_counter()
            sums = np.zeros(3)
            n = 0
            bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.optim.epochs}", leave=False)
            for batch in bar:
                before = normalise(batch["before"].float().to(device), spec)
                after = normalise(batch["after"].float().to(device), spec)
                # One of the five references per pair and step, as in the LEVIR-CC recipes.
                tokens = vocab.encode([rng.choice(caps) for caps in batch["captions"]]).to(device)
                cd_logits, cap_logits = module(before, after, tokens[:, :-1])
                loss, parts = pix4cap_loss(cd_logits, batch["mask"].to(device), cap_logits, tokens[:, 1:])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.optim.grad_clip:
                    torch.nn.utils.clip_grad_norm_(module.parameters(), cfg.optim.grad_clip)
                opt.step()
                step += 1
                sums += (float(loss.detach()), parts["loss_det"], parts["loss_cap"])
                n += 1
                bar.set_postfix(loss=f"{sums[0] / n:.3f}")
                if cfg.optim.max_steps and step >= cfg.optim.max_steps:
                    break
            model = TorchChangeModel(module, spec, vocab, name=cfg.model_name, version=cfg.model_version,
                                     architecture=cfg.architecture)
            metrics = evaluate(model, val_set, cfg.optim.batch_size)
            score = metrics["IoU"] + metrics["BLEU-4"]
            writer.writerow([epoch + 1, step, *(sums / max(n, 1)).round(4), round(metrics["IoU"], 4),
                             round(metrics["F1"], 4), round(metrics["BLEU-4"], 4), round(metrics["CIDEr-D"], 4),
                             round(time.perf_counter() - t0, 1)])
            log_file.flush()
            print(f"epoch {epoch + 1}: loss {sums[0] / max(n, 1):.3f}  val IoU {metrics['IoU']:.3f}  "
                  f"F1 {metrics['F1']:.3f}  BLEU-4 {metrics['BLEU-4']:.3f}  CIDEr-D {metrics['CIDEr-D']:.3f}")
            if score > best:
                best, best_metrics = score, metrics
                torch.save(module.state_dict(), out / "best.pt")
            torch.save({"model": module.state_dict(), "optim": opt.state_dict(), "epoch": epoch, "step": step,
                        "best": best}, ckpt)
            if cfg.optim.max_steps and step >= cfg.optim.max_steps:
                break
    module.load_state_dict(torch.load(out / "best.pt", map_location=device, weights_only=True))
    module.to("cpu")
    return save_model_file(
        out / cfg.model_name, module, cfg.architecture, arch_cfg, spec, vocab, name=cfg.model_name,
        version=cfg.model_version, licence=cfg.licence,
        training_data=cfg.training_data or f"synthetic generator: {d.train_pairs} pairs of {d.size}² px, "
                                           f"seeds {d.first_seed}..{d.first_seed + d.train_pairs - 1}",
        metrics={"split": f"held-out synthetic pairs (seeds from {d.first_seed + 1_000_000}, n={d.val_pairs})",
                 **{k: round(v, 4) for k, v in best_metrics.items()}},
        recipe=cfg.to_dict())
