"""Calibrate a change model's decision point: ``python -m changescribe.training calibrate MODEL --threshold T --out DIR``.

A model trained mostly on synthesised change is under-confident on real imagery: on held-out real crops its
F1-best probability threshold sits well below 0.5 (README, "Threshold"). Every consumer (CLI, dock, Processing,
the probability raster, eval) cuts at 0.5 by default, so the fix belongs in the model, not in each caller:
adding ``log((1 - T) / T)`` to the change class's logit moves probability ``T`` to exactly 0.5 and keeps the
order of all pixels (the probability map is a monotone function of the original). The copy's card records the
shift and keeps the original's metrics apart, because they were measured at the old decision point.
"""

from __future__ import annotations

import math
import shutil
import tempfile
from pathlib import Path

import torch

from changescribe.core.errors import ModelError
from changescribe.core.model_file import CARD_SUFFIX, WEIGHTS_SUFFIX, read_card, save_model_file
from changescribe.core.model_loading import build_from_card, find_model
from changescribe.core.models.registry import BitCD, DFM, Pix4Cap, SemanticCC, config_from_dict, get_entry

__all__ = ["CHANGE_CLASSIFIER_BIAS", "calibrate_model_file", "change_logit_shift"]

# architecture class -> the state-dict key of the bias of its two-class (no change, change) classifier
CHANGE_CLASSIFIER_BIAS = {Pix4Cap: "cd_head.head.2.bias", BitCD: "head.3.bias", DFM: "cd.head.3.bias",
                          SemanticCC: "cd_decoder.proj.bias"}
# card fields save_model_file writes itself (or that only describe the file on disk)
_FILE_FIELDS = {"format", "architecture", "config", "input", "vocabulary", "weights", "sha256", "created"}


def change_logit_shift(threshold: float) -> float:
    """The amount added to the change logit so that probability ``threshold`` becomes 0.5."""
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold must be between 0 and 1 (exclusive), got {threshold:g}")
    return math.log((1.0 - threshold) / threshold)


def calibrate_model_file(model: str | Path, threshold: float, out: str | Path) -> Path:
    """Write a copy of ``model`` into folder ``out`` whose probability 0.5 is the original's ``threshold``.

    The copy keeps the original's name (it replaces it where installed); files already in ``out`` are never
    overwritten. Calibrating a calibrated model composes: the card holds the total shift.
    """
    shift = change_logit_shift(threshold)
    try:
        card = read_card(find_model(str(model)))
    except ModelError as e:
        raise ValueError(str(e)) from None
    arch = card["architecture"]
    try:
        key = CHANGE_CLASSIFIER_BIAS.get(get_entry(arch).builder)
    except ValueError as e:  # not a registered architecture
        raise ValueError(f"{card['_card_path']}: {e}") from None
    if key is None:
        raise ValueError(f"{card['_card_path']}: architecture {arch!r} has no change classifier to calibrate "
                         "(it captions only)")
    out = Path(out)
    targets = [out / (card["name"] + CARD_SUFFIX), out / (card["name"] + WEIGHTS_SUFFIX)]
    taken = [str(t) for t in targets if t.exists()]
    if taken:
        raise FileExistsError(f"{' and '.join(taken)}: already there; calibrate writes a new model file, choose "
                              "another --out")
    wrapped = build_from_card(card)
    bias = dict(wrapped.module.named_parameters())[key]
    with torch.no_grad():
        bias[1] += shift  # index 1 = change (the probability the pipeline reads)
    before = card.get("calibration") or {}
    total = float(before.get("change_logit_shift", 0.0)) + shift
    fields = {k: v for k, v in card.items() if k not in _FILE_FIELDS and not k.startswith("_")}
    fields["metrics"] = {}  # measured at the old decision point: kept under calibration, re-record them
    fields["calibration"] = {
        "change_logit_shift": round(total, 6),
        "original_threshold": round(1.0 / (1.0 + math.exp(total)), 6),
        "why": f"probability {threshold:g} of the model before calibration is this file's 0.5",
        "metrics_before": card.get("metrics") or before.get("metrics_before") or {},
    }
    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".calibrate-", dir=out))
    try:
        written = save_model_file(staging / card["name"], wrapped.module, arch, config_from_dict(arch, card["config"]),
                                  wrapped.input_spec, wrapped.vocabulary, **fields)
        # weights first: a card never names weights that are not there yet
        written.with_suffix(WEIGHTS_SUFFIX).replace(targets[1])
        written.replace(targets[0])
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return targets[0]
