"""The word vocabulary a captioning recipe trains with (Pix4Cap, SEN, DFM, Semantic-CC's word decoder).

One builder for every recipe, so that models trained on the same data share the same token ids and a
vocabulary built from LEVIR-CC's train split (as the LEVIR-CC literature does) is the default everywhere.
"""

from __future__ import annotations

import logging
from pathlib import Path

from changescribe.core.vocabulary import Vocabulary

from .config import TrainConfig
from .datasets.levir import CAPTIONS_FILE, read_captions

log = logging.getLogger(__name__)


def _levircc_captions_path(cfg: TrainConfig) -> Path | None:
    v, d = cfg.vocabulary, cfg.data
    if v.path:
        return Path(v.path)
    if d.source in ("levircc", "levirmci"):
        return Path(d.captions) if d.captions else Path(d.root or ".") / CAPTIONS_FILE
    return None


def build_vocabulary(cfg: TrainConfig, train_captions: list[list[str]]) -> Vocabulary:
    """LEVIR-CC's train-split words (``vocabulary.source: levircc``), else the training captions' words."""
    v = cfg.vocabulary
    path = _levircc_captions_path(cfg)
    if v.source == "levircc" and path is not None and path.is_file():
        caps = [c for r in read_captions(path) if r.split == "train" for c in r.captions]
        if caps:
            return Vocabulary.build(caps, min_count=v.min_count, max_length=v.max_length)
    if v.source == "levircc":
        log.warning("LEVIR-CC captions not found at %s; building the vocabulary from the training captions", path)
    return Vocabulary.build([c for caps in train_captions for c in caps], min_count=v.min_count,
                            max_length=v.max_length)


def training_captions(ds) -> list[list[str]]:
    """Every pair's reference captions; datasets that know them all skip reading the images."""
    caps = getattr(ds, "captions", None)
    if caps is None:
        caps = [ds[i]["captions"] for i in range(len(ds))]
    return caps
