"""Unlabelled multi-date tiles and the two augmented bi-temporal views SEN's contrastive pre-training needs.

A *place* is one location seen at several dates (co-registered, same size, in time order). Sources of places:

* ``data.source: "multidate"``, ``data.root`` = ROOT, one of two layouts:

  - **place folders** ``ROOT/<place>/<date>``: each ``<date>`` is an 8-bit RGB image (``.png``, ``.jpg``,
    ``.tif``) or a folder holding Sentinel-2 bands ``B4.tif``, ``B3.tif``, ``B2.tif`` (SSL4EO-S12's layout:
    ROOT = ``.../s2c``, ``<place>/<acquisition folder>/B*.tif``; reflectance x 10^4 scaled to 8 bits as
    SSL4EO-S12's uint8 release does, ``value / 10000 x 255``). **Names must sort in time order** (ISO dates
    ``2019-04-01.png``, ``0_winter.png``, SSL4EO's ``20200315T...``); places with fewer than two dates are skipped;
  - **date folders** ``ROOT/A/<name>``, ``ROOT/B/<name>`` (LEVIR-CC ``images/<split>``, LEVIR-CD, the shared
    samples): each name is a place with two dates, A before B.

* any bi-temporal source of :func:`..build_dataset` (``synthetic``, ``levircc``, ``levirmci``, ``levircd``): each
  pair is a place with two dates (before, after); captions and masks are not used.

:class:`BiTemporalViews` turns places into MoCo items (SEN Sec. III-B): for the query and for the key it picks
two dates ``i, j`` of the place, stacks them into one 6-band image *older first* and augments it with
:class:`.augment.BiTemporalAugment` (one geometry for both dates, light per date). ``strategy``: ``ordered``
draws ``i <= j`` uniformly among the ``n(n+1)/2`` pairs (SEN's choice, 10 pairs for four seasons; ``i == j`` is
allowed, as in the paper's count), ``unordered`` draws ``i`` and ``j`` independently (``n^2`` pairs, either
order). ``season``: ``augment`` draws the query's and the key's dates independently (SEN's choice, Table VII),
``random`` gives both the same dates. Tiles larger than ``size`` are cut to one random ``size`` window per item,
the same for all its dates and both views (query and key must show the same ground).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch.utils.data import Dataset

from ..config import AugmentConfig, DataConfig
from .augment import BiTemporalAugment
from .common import IMAGE_SUFFIXES, find_image, image_files, read_rgb

log = logging.getLogger(__name__)

STRATEGIES = ("ordered", "unordered")
SEASONS = ("augment", "random")
S2_RGB = ("B4", "B3", "B2")
S2_SCALE = 255.0 / 10000.0  # SSL4EO-S12's uint8 conversion of reflectance x 10^4


class Places(Protocol):
    """Locations seen at several dates."""

    def __len__(self) -> int: ...

    def num_dates(self, i: int) -> int: ...

    def load(self, i: int, dates: list[int]) -> list[torch.Tensor]: ...

    def name(self, i: int) -> str: ...


def read_s2_rgb(folder: Path) -> torch.Tensor:
    """A Sentinel-2 acquisition folder (``B4.tif``, ``B3.tif``, ``B2.tif``) -> uint8 (3, H, W)."""
    import rasterio

    bands = []
    for b in S2_RGB:
        with rasterio.open(folder / f"{b}.tif") as src:
            bands.append(src.read(1).astype(np.float32))
    if len({a.shape for a in bands}) != 1:
        raise ValueError(f"{folder}: bands {S2_RGB} differ in size")
    rgb = np.clip(np.stack(bands) * S2_SCALE, 0, 255).astype(np.uint8)
    return torch.from_numpy(rgb)


def _is_date(p: Path) -> bool:
    if p.is_dir():
        return all((p / f"{b}.tif").is_file() for b in S2_RGB)
    return p.suffix.lower() in IMAGE_SUFFIXES


def _read_date(p: Path) -> torch.Tensor:
    return read_s2_rgb(p) if p.is_dir() else read_rgb(p)


class MultiDateTiles:
    """Places read from ``ROOT`` (see the module docstring for the two layouts)."""

    def __init__(self, root: str | Path, limit: int | None = None) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"multidate: data.root {self.root} is not a folder")
        self.places: list[tuple[str, list[Path]]] = []
        if (self.root / "A").is_dir() and (self.root / "B").is_dir():
            for a in image_files(self.root / "A"):
                b = find_image(self.root / "B", a.name)
                if b is not None:
                    self.places.append((a.stem, [a, b]))
        else:
            skipped = 0
            for place in sorted(p for p in self.root.iterdir() if p.is_dir()):
                dates = sorted((p for p in place.iterdir() if _is_date(p)), key=lambda p: p.name)
                if len(dates) < 2:
                    skipped += 1
                    continue
                self.places.append((place.name, dates))
                if limit is not None and len(self.places) >= limit:
                    break
            if skipped:
                log.info("multidate %s: %d places with fewer than two dates skipped", self.root, skipped)
        if limit is not None:
            del self.places[limit:]
        if not self.places:
            raise FileNotFoundError(f"multidate: no place with two or more dates in {self.root} (layouts: "
                                    "ROOT/<place>/<date>.png|tif or ROOT/A, ROOT/B)")

    def __len__(self) -> int:
        return len(self.places)

    def num_dates(self, i: int) -> int:
        return len(self.places[i][1])

    def name(self, i: int) -> str:
        return self.places[i][0]

    def load(self, i: int, dates: list[int]) -> list[torch.Tensor]:
        name, paths = self.places[i]
        read = {t: _read_date(paths[t]) for t in dict.fromkeys(dates)}
        shapes = {tuple(x.shape) for x in read.values()}
        if len(shapes) != 1:
            raise ValueError(f"multidate place {name}: its dates differ in size {sorted(shapes)}; the tiles of "
                             "one place must be co-registered")
        return [read[t] for t in dates]


class PairPlaces:
    """A bi-temporal dataset (items with ``before``/``after``) as places with two dates."""

    def __init__(self, dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def num_dates(self, i: int) -> int:
        return 2

    def name(self, i: int) -> str:
        names = getattr(self.dataset, "names", None)
        return str(names[i]) if names is not None else f"pair_{i}"

    def load(self, i: int, dates: list[int]) -> list[torch.Tensor]:
        item = self.dataset[i]
        both = (item["before"], item["after"])
        return [both[t] for t in dates]


def date_pair(n: int, strategy: str, generator: torch.Generator | None = None) -> tuple[int, int]:
    """Two date indices of a place with ``n`` dates: ``ordered`` -> i <= j, uniform over the n(n+1)/2 pairs;
    ``unordered`` -> i, j independent."""
    if strategy == "ordered":
        pairs = [(i, j) for i in range(n) for j in range(i, n)]
        return pairs[int(torch.randint(len(pairs), (), generator=generator))]
    if strategy == "unordered":
        i, j = torch.randint(n, (2,), generator=generator).tolist()
        return int(i), int(j)
    raise ValueError(f"unknown contrastive.strategy {strategy!r}; use {' or '.join(STRATEGIES)}")


class BiTemporalViews(Dataset):
    """MoCo items ``{"query", "key": uint8 (6, size, size), older date in bands 0-2, "dates": (iq, jq, ik, jk),
    "name"}`` from places (see the module docstring)."""

    def __init__(self, places: Places, size: int, augment: BiTemporalAugment, strategy: str = "ordered",
                 season: str = "augment") -> None:
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown contrastive.strategy {strategy!r}; use {' or '.join(STRATEGIES)}")
        if season not in SEASONS:
            raise ValueError(f"unknown contrastive.season {season!r}; use {' or '.join(SEASONS)}")
        if augment.cfg.time_swap:
            raise ValueError("sen-pretrain: data.augment.time_swap must be 0 (the date order is the strategy's: "
                             "use contrastive.strategy 'unordered' to mix it)")
        self.places, self.size, self.augment = places, size, augment
        self.strategy, self.season = strategy, season

    def __len__(self) -> int:
        return len(self.places)

    def _window(self, h: int, w: int, name: str) -> tuple[int, int]:
        if h < self.size or w < self.size:
            raise ValueError(f"place {name}: tiles of {h}x{w} px are smaller than data.size {self.size}")
        top = int(torch.randint(h - self.size + 1, ()))
        left = int(torch.randint(w - self.size + 1, ()))
        return top, left

    def _view(self, older: torch.Tensor, newer: torch.Tensor) -> torch.Tensor:
        item = self.augment({"before": older, "after": newer})
        return torch.cat([item["before"], item["after"]])

    def __getitem__(self, i: int) -> dict:
        n, name = self.places.num_dates(i), self.places.name(i)
        iq, jq = date_pair(n, self.strategy)
        ik, jk = date_pair(n, self.strategy) if self.season == "augment" else (iq, jq)
        dates = [iq, jq, ik, jk]
        tiles = self.places.load(i, dates)
        h, w = tiles[0].shape[-2:]
        top, left = self._window(h, w, name)
        tiles = [t[:, top:top + self.size, left:left + self.size] for t in tiles]
        return {"query": self._view(tiles[0], tiles[1]), "key": self._view(tiles[2], tiles[3]),
                "dates": torch.tensor(dates), "name": name}


def build_places(d: DataConfig, progress: bool = True) -> Places:
    """The places of ``d``: a multidate folder, or the training split of a bi-temporal source (unaugmented:
    the views are augmented later, once each)."""
    if d.source == "multidate":
        if not d.root:
            raise ValueError("data.source 'multidate' needs data.root")
        return MultiDateTiles(d.root, limit=d.limit)
    from . import build_dataset

    plain = dataclasses.replace(d, augment=AugmentConfig())
    return PairPlaces(build_dataset(plain, d.train_split, train=True, progress=progress))
