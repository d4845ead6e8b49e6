"""Pix4Cap's CD pseudo-labels: a trained change detector labels every LEVIR-CC pair.

``python -m changescribe.training pseudo-labels --cd-model CARD --data LEVIR_CC_ROOT --out DIR`` writes
``DIR/<split>/<name>.png`` (8-bit, {0, 255}, the LEVIR-CD convention; same file names as LEVIR-CC) for every
pair of the caption file. The pix4cap recipe then reads them with ``data.source: "levircc"``,
``data.root: LEVIR_CC_ROOT``, ``data.pseudo_labels: DIR``.

Resumable: masks already on disk are skipped, and each mask is written under a temporary name and renamed
into place, so an interrupted run never leaves a truncated mask that a later run would take for done.
Batched: pairs go through the model ``batch_size`` at a time on the chosen device.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from .datasets.common import collate
from .datasets.levir import LevirCCDataset, read_captions, split_counts

log = logging.getLogger(__name__)


def _write_png(mask: np.ndarray, path: Path) -> None:
    from PIL import Image

    tmp = path.with_name(path.stem + ".tmp.png")
    Image.fromarray(mask, mode="L").save(tmp)
    os.replace(tmp, path)


def write_pseudo_labels(cd_model: str | os.PathLike, data_root: str | os.PathLike, out_dir: str | os.PathLike, *,
                        captions: str | os.PathLike | None = None, splits: tuple[str, ...] | None = None,
                        batch_size: int = 16, threshold: float = 0.5, device: str = "cpu", num_workers: int = 0,
                        missing: str = "error", progress: bool = True) -> dict[str, dict[str, int]]:
    """Label every LEVIR-CC pair with ``cd_model``; returns ``{split: {"written": n, "skipped": m}}``."""
    from changescribe.core.model_loading import load_model

    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold must be between 0 and 1, got {threshold}")
    root, out = Path(data_root), Path(out_dir)
    cap_path = Path(captions) if captions else root / "LevirCCcaptions.json"
    splits = splits or tuple(split_counts(read_captions(cap_path)))
    model = None
    report: dict[str, dict[str, int]] = {}
    for split in splits:
        ds = LevirCCDataset(root, split, cap_path, missing=missing)
        target = out / split
        target.mkdir(parents=True, exist_ok=True)
        for stale in target.glob("*.tmp.png"):  # left by an interrupted run
            stale.unlink()
        todo = [i for i, name in enumerate(ds.names) if not (target / (Path(name).stem + ".png")).exists()]
        report[split] = {"written": 0, "skipped": len(ds) - len(todo)}
        if not todo:
            continue
        if model is None:
            model = load_model(cd_model, device)
            if not model.can_detect:
                raise ValueError(f"{cd_model}: model {model.name!r} has no change head; use a change detector")
            log.info("pseudo-labels with %s on %s", model.name, device)
        loader = DataLoader(Subset(ds, todo), batch_size=batch_size, collate_fn=collate, num_workers=num_workers)
        with tqdm(total=len(todo), desc=f"pseudo-labels {split}", disable=not progress) as bar:
            for batch in loader:
                prob = model.change_probability(batch["before"].float(), batch["after"].float())
                masks = ((prob >= threshold).to(torch.uint8) * 255).cpu().numpy()
                for name, mask in zip(batch["name"], masks):
                    _write_png(mask, target / (name + ".png"))
                report[split]["written"] += len(masks)
                bar.update(len(masks))
    return report
