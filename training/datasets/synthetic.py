"""Synthetic bi-temporal pairs (training.synthetic) as a torch Dataset with known masks and captions.

Pairs are rendered once from consecutive seeds and kept in memory as uint8, so an epoch costs no rendering
and the same seeds always give the same data (held-out splits are disjoint seed ranges).
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from changescribe.training.synthetic import make_pair

from .common import IGNORE


class SyntheticChangeDataset(Dataset):
    """``count`` pairs of ``size``² pixels from seeds ``first_seed`` onwards."""

    def __init__(self, count: int, size: int = 256, first_seed: int = 0, p_no_change: float = 0.3,
                 change_level: float = 0.6, nuisance: float = 0.5, progress: bool = True,
                 ignore_masks: bool = False):
        """``ignore_masks``: the masks are unlabelled (IGNORE), for pairs that train captions only."""
        self.before = torch.empty((count, 3, size, size), dtype=torch.uint8)
        self.after = torch.empty_like(self.before)
        self.mask = torch.empty((count, size, size), dtype=torch.uint8)
        self.captions: list[list[str]] = []
        self.first_seed = first_seed
        for i in tqdm(range(count), desc=f"rendering synthetic pairs {first_seed}+", disable=not progress):
            pair = make_pair(size, seed=first_seed + i, change_level=change_level, nuisance=nuisance,
                             p_no_change=p_no_change)
            self.before[i] = torch.from_numpy(np.ascontiguousarray(pair.before[:3]))
            self.after[i] = torch.from_numpy(np.ascontiguousarray(pair.after[:3]))
            self.mask[i] = IGNORE if ignore_masks else torch.from_numpy(pair.change_mask)
            self.captions.append(pair.captions)

    def __len__(self) -> int:
        return self.before.shape[0]

    def __getitem__(self, i: int) -> dict:
        return {"before": self.before[i], "after": self.after[i], "mask": self.mask[i], "captions": self.captions[i],
                "name": f"synthetic_{self.first_seed + i}"}
