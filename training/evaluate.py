"""``python -m changescribe.training eval MODEL_CARD``: the papers' metric table for a model file.

Captions: BLEU-1..4, METEOR, ROUGE-L, CIDEr-D, S_m* (pycocoevalcap); masks: Precision, Recall, F1, IoU, OA
(torchmetrics). Data: a dataset folder named with ``--data DIR`` (LEVIR-CD or LEVIR-CC layout), a split of a
recipe's dataset (``--config``, ``--split test``), or else held-out generated scenes (seeds disjoint from
training and validation). Caption
metrics need a captioner and captions; mask metrics need labelled masks (255 = unlabelled is left out).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from torch.utils.data import DataLoader, Dataset

from changescribe.core.model_api import ChangeModel
from changescribe.core.model_loading import load_model

from .config import DataConfig
from .datasets.common import collate
from .datasets.synthetic import SyntheticChangeDataset
from .metrics import MaskScores, caption_scores

TEST_FIRST_SEED = 2_000_000  # training uses 0.., validation 1,000,000..


def evaluate(model: ChangeModel, data, batch_size: int, meteor: bool = False, beam_size: int = 1,
             num_workers: int = 0, threshold: float = 0.5) -> dict[str, float]:
    """Mask metrics over all labelled pixels (a pixel is change when its probability is ≥ ``threshold``) and,
    for captioners, caption metrics against all references."""
    scores = MaskScores(threshold)
    refs: list[list[str]] = []
    hyps: list[str] = []
    captions = model.can_caption
    detects = model.can_detect  # SEN before its pairing: captions only
    loader = DataLoader(data, batch_size=batch_size, collate_fn=collate, num_workers=num_workers)
    referenced = True  # a pair without references voids the caption metrics: stop generating captions
    for batch in loader:
        before, after = batch["before"].float().to(model.device), batch["after"].float().to(model.device)
        referenced = referenced and all(batch["captions"])
        if detects:
            pred = model.predict(before, after, with_captions=captions and referenced, beam_size=beam_size)
            scores.update(pred.probability, batch["mask"])
            hyp = pred.captions
        else:
            hyp = model.caption(before, after, beam_size=beam_size) if captions and referenced else None
        if captions and hyp is not None:
            refs += batch["captions"]
            hyps += hyp
    out = {k: v for k, v in scores.compute().items() if not math.isnan(v)}
    if hyps and referenced:
        out.update(caption_scores(refs, hyps, meteor=meteor))
    return out


def folder_dataset(root: str | Path, split: str | None, crop_size: int) -> tuple[Dataset, str]:
    """A dataset folder named on the command line: the LEVIR-CD layout (``A/ B/ label/``, directly or under
    ``split/``) or the LEVIR-CC / LEVIR-MCI layout (a caption file, images under ``images/<split>/``)."""
    from .datasets.levir import CAPTIONS_FILE, LevirCCDataset, LevirCDDataset, LevirMCIDataset

    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"--data {root}: not a folder")
    for sub in ([split] if split else []) + [None]:
        d = root / sub if sub else root
        if all((d / name).is_dir() for name in ("A", "B", "label")):
            ds = LevirCDDataset(root, sub, crop_size=crop_size)
            return ds, f"LEVIR-CD layout {d} ({crop_size}² crops)"
    if (root / CAPTIONS_FILE).is_file():
        cc_split = split or "test"
        mci = (root / "images" / cc_split / "label").is_dir()
        ds = (LevirMCIDataset if mci else LevirCCDataset)(root, cc_split, missing="skip")
        return ds, f"{'LEVIR-MCI' if mci else 'LEVIR-CC'} layout {root}, {cc_split} split"
    raise ValueError(f"--data {root}: neither the LEVIR-CD layout (A/, B/, label/) nor the LEVIR-CC layout "
                     f"({CAPTIONS_FILE} + images/<split>/A, B)")


def evaluate_model_file(card: str, pairs: int = 200, size: int | None = None, beam_size: int = 3,
                        device: str = "cpu", batch_size: int = 16, data: DataConfig | None = None,
                        split: str | None = "test", folder: str | Path | None = None,
                        threshold: float = 0.5) -> dict:
    """The metric table of a model file on generated test pairs, on ``split`` of ``data``, or on a dataset
    ``folder`` (:func:`folder_dataset`), masks cut at ``threshold``. ``data`` says which data was scored and how
    many pairs."""
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold must be between 0 and 1 (exclusive), got {threshold:g}")
    model = load_model(card, device)
    if folder is not None:
        ds, desc = folder_dataset(folder, split, model.input_spec.tile_size)
    elif data is not None and data.source != "synthetic":
        from .datasets import build_dataset

        ds = build_dataset(data, split)
        desc = f"{data.source} {split or 'all'} ({data.root})"
    else:
        size = size or model.input_spec.tile_size
        ds = SyntheticChangeDataset(pairs, size, TEST_FIRST_SEED, p_no_change=0.3)
        desc = f"generated scenes (training.synthetic), seeds {TEST_FIRST_SEED}..{TEST_FIRST_SEED + pairs - 1}, {size}² px"
    if len(ds) == 0:
        raise ValueError(f"{desc}: no pairs to score")
    scores = evaluate(model, ds, batch_size, meteor=True, beam_size=beam_size, threshold=threshold)
    return {"data": desc, "pairs": len(ds), "beam_size": beam_size, "threshold": threshold,
            **{k: round(v, 4) for k, v in scores.items()}}


def record_metrics(card: str | Path, block: str, scores: dict, label: str) -> Path:
    """Write ``scores`` into the model card's ``metrics[block]`` with the data they come from (``label``, short:
    what a one-line summary says, e.g. "real crops (LEVIR-CD)"). The card's weights and checksum are untouched."""
    from changescribe.core.atomic import atomic_path
    from changescribe.core.model_loading import find_model

    path = find_model(card)
    data = json.loads(Path(path).read_text())
    metrics = dict(data.get("metrics") or {})
    if "split" in metrics:  # a card straight from training: its one flat block is the validation
        split = str(metrics["split"]).lower()
        kind = ("synthesised change on real imagery" if "real imagery" in split else
                "generated scenes" if "synthetic" in split else "the validation split")
        metrics = {"validation": {"data": kind, **metrics}}
    metrics[block] = {"data": label, "split": scores["data"], "pairs": scores["pairs"],
                      **{k: v for k, v in scores.items() if k not in ("data", "pairs")}}
    data["metrics"] = metrics
    with atomic_path(path, ".tmp.json") as tmp:
        Path(tmp).write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n")
    return Path(path)


def print_table(scores: dict) -> None:
    """The metric tables, under a first line that says which data was scored and how many pairs."""
    print(f"scored: {scores['data']}: {scores['pairs']} pairs")
    cap = ["BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr-D", "S_m*"]
    cd = ["Precision", "Recall", "F1", "IoU", "OA"]
    for keys in (cap, cd):
        if not all(k in scores for k in keys):
            continue
        print("| " + " | ".join(keys) + " |")
        print("|" + "---|" * len(keys))
        print("| " + " | ".join(f"{100 * scores[k]:.2f}" for k in keys) + " |")
    print(json.dumps(scores))
