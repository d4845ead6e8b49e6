"""Saying what a model card claims, in words: one summary line and the labelled metric blocks.

Metrics mean little without the data they were measured on (a model scoring F1 0.86 on generated scenes may
score far less on real imagery), so every figure shown carries its data label. Shared by the dock (summary line
and folded card) and ``changescribe models``; standard library only, so it works without torch or Qt.

Card convention: ``card["metrics"]`` is a dict of blocks, each with metric keys (F1, BLEU-4, ...) and
optionally ``"data"`` (a short label: "generated scenes", "real crops (LEVIR-CD, DSIFN)"), ``"split"`` (a longer
description) and ``"pairs"``. Older cards may hold one flat block, or blocks without ``"data"``.
"""

from __future__ import annotations

from typing import Any

GENERATED = "generated scenes"
SUMMARY_METRICS = ("F1", "BLEU-4")
KEY_METRICS = ("F1", "IoU", "OA", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr-D", "S_m*")


def metric_blocks(card: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(name, block) pairs: a flat ``metrics`` dict is one unnamed block; test blocks come first."""
    metrics = card.get("metrics") or {}
    if not isinstance(metrics, dict) or not metrics:
        return []
    if all(isinstance(v, dict) for v in metrics.values()):
        return sorted(metrics.items(), key=lambda kv: not _is_test(*kv))
    return [("", metrics)]


def data_label(name: str, block: dict[str, Any]) -> str:
    """What data a block's figures come from: its ``data``, "generated scenes" for old synthetic splits."""
    if block.get("data"):
        return str(block["data"])
    if "synthetic" in f"{block.get('split', '')} {name}".lower():
        return GENERATED
    return f"the {name} split" if name else "unstated data"


def summary_metrics(card: dict[str, Any]) -> str:
    """'F1 0.71 on real crops, 0.86 on generated scenes · BLEU-4 …': one block per data, real data first."""
    chosen: dict[str, dict[str, Any]] = {}
    for name, block in metric_blocks(card):  # test blocks first: they win for their data
        chosen.setdefault(data_label(name, block), block)
    order = sorted(chosen, key=_real_first)
    parts = []
    for key in SUMMARY_METRICS:
        values = [(label, chosen[label][key]) for label in order if _number(chosen[label].get(key))]
        if not values:
            continue
        if len(order) == 1:
            parts.append(f"{key} {values[0][1]:.2f}")
        else:
            parts.append(f"{key} " + ", ".join(f"{v:.2f} on {label}" for label, v in values))
    if len(order) == 1 and parts:
        return ", ".join(parts) + f" on {order[0]}"
    return " · ".join(parts)


def _real_first(label: str) -> int:
    """Scores on real data come first, those on generated or synthesised data last."""
    if label == GENERATED or "synthesised" in label or "synthetic" in label:
        return 2
    return 0 if label.startswith("real") else 1


def card_summary(card: dict[str, Any]) -> str:
    """One line: what the model does, at what GSD and tile size, how well on what data, under which terms."""
    inp = card.get("input", {})
    parts = ["change mask + captions" if card.get("vocabulary") else "change mask only"]
    if inp.get("gsd"):
        parts.append(f"{inp['gsd']:g} m/px")
    if inp.get("tile_size"):
        parts.append(f"{inp['tile_size']} px tiles")
    metrics = summary_metrics(card)
    if metrics:
        parts.append(metrics)
    if card.get("weights_terms"):
        parts.append(str(card["weights_terms"]))
    return " · ".join(parts)


def metric_lines(card: dict[str, Any]) -> list[str]:
    """One line per metric block, each saying which data and split it was measured on."""
    lines = []
    for name, block in metric_blocks(card):
        shown = [f"{k} {block[k]:.3g}" for k in KEY_METRICS if _number(block.get(k))]
        if not shown:
            continue
        where = [str(block["split"])] if block.get("split") else ([name] if name and block.get("data") else [])
        if _number(block.get("pairs")):
            where.append(f"{int(block['pairs'])} pairs")
        detail = f" ({'; '.join(where)})" if where else ""
        lines.append(f"Metrics on {data_label(name, block)}{detail}: " + ", ".join(shown))
    return lines


def _is_test(name: str, block: dict[str, Any]) -> bool:
    return name == "test" or "test" in str(block.get("split", "")).lower().split()


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
