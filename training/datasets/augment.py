"""Augmentations for bi-temporal pairs: one geometry for both dates, one light per date.

* **Geometric** (flips and 90-degree rotations, the 8 symmetries of the square): drawn once per pair and
  applied identically to *before*, *after*, the mask and any class map, so pixels stay co-registered.
  **Off by default for caption training**: LEVIR-CC captions name positions ("on the left", "at the top",
  "in the upper right corner"), and a flipped or rotated pair would then contradict its captions. Turn it on
  (``data.augment.geometric``) for change-detection recipes, or knowingly for captioners.
* **Photometric** (brightness, contrast, saturation, hue): drawn independently for each date, because two
  acquisitions differ in sun, haze, season and sensor; the model must learn to ignore such differences.
  The mask is untouched.
* **Time swap** (before <-> after with probability ``time_swap``): a change mask is symmetric in time, a caption
  is not ("houses are built" vs "houses are demolished"). Only change-detection recipes may use it; the
  captioning recipes refuse it (:func:`check_for_captions`).

Randomness comes from torch's generator (global, or the one passed in), which the engine reseeds per epoch and
DataLoader workers reseed per worker, so augmented runs are reproducible and resumable.
"""

from __future__ import annotations

import torch

from ..config import AugmentConfig


def check_for_captions(cfg: AugmentConfig, recipe: str) -> None:
    """Refuse augmentations that make captions wrong."""
    if cfg.time_swap:
        raise ValueError(f"recipe {recipe!r} trains captions: data.augment.time_swap must be 0 "
                         "(swapping the dates turns 'built' into 'demolished')")


def _uniform(lo: float, hi: float, g: torch.Generator | None) -> float:
    return float(lo + (hi - lo) * torch.rand((), generator=g))


class BiTemporalAugment:
    """Callable ``item -> item`` (see the module docstring). ``enabled`` is False when it would do nothing."""

    def __init__(self, cfg: AugmentConfig, generator: torch.Generator | None = None) -> None:
        self.cfg = cfg
        self.generator = generator

    @property
    def enabled(self) -> bool:
        return bool(self.cfg.geometric or self.cfg.photometric or self.cfg.time_swap)

    def _photometric(self, img: torch.Tensor) -> torch.Tensor:
        from torchvision.transforms.v2 import functional as TF

        c, g = self.cfg, self.generator
        if c.brightness:
            img = TF.adjust_brightness(img, _uniform(1 - c.brightness, 1 + c.brightness, g))
        if c.contrast:
            img = TF.adjust_contrast(img, _uniform(1 - c.contrast, 1 + c.contrast, g))
        if c.saturation:
            img = TF.adjust_saturation(img, _uniform(1 - c.saturation, 1 + c.saturation, g))
        if c.hue:
            img = TF.adjust_hue(img, _uniform(-c.hue, c.hue, g))
        return img

    def __call__(self, item: dict) -> dict:
        item = dict(item)
        g = self.generator
        if self.cfg.geometric:
            k = int(torch.randint(0, 4, (), generator=g))
            flip = bool(torch.rand((), generator=g) < 0.5)
            for key in ("before", "after", "mask", "classes"):
                t = item.get(key)
                if isinstance(t, torch.Tensor):
                    if flip:
                        t = t.flip(-1)
                    item[key] = torch.rot90(t, k, dims=(-2, -1)).contiguous()
        if self.cfg.photometric:
            item["before"] = self._photometric(item["before"])
            item["after"] = self._photometric(item["after"])
        if self.cfg.time_swap and float(torch.rand((), generator=g)) < self.cfg.time_swap:
            item["before"], item["after"] = item["after"], item["before"]
        return item


class AugmentedDataset(torch.utils.data.Dataset):
    """A dataset whose items pass through an augmentation (training splits only)."""

    def __init__(self, dataset, augment: BiTemporalAugment) -> None:
        self.dataset, self.augment = dataset, augment

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict:
        return self.augment(self.dataset[i])

    def __getattr__(self, name: str):  # captions, names, ... of the wrapped dataset
        if name in ("dataset", "augment"):
            raise AttributeError(name)
        return getattr(self.dataset, name)
