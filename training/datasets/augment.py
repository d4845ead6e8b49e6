"""Augmentations for bi-temporal pairs: one geometry for both dates, one light per date.

* **Geometric** (flips and 90-degree rotations, the 8 symmetries of the square): drawn once per pair and
  applied identically to *before*, *after*, the mask and any class map, so pixels stay co-registered.
  **Off by default for caption training**: LEVIR-CC captions name positions ("on the left", "at the top",
  "in the upper right corner"), and a flipped or rotated pair would then contradict its captions. Turn it on
  (``data.augment.geometric``) for change-detection recipes, or knowingly for captioners.
* **Random resized crop** (``crop``): a window of the tile's proportions whose area fraction is drawn
  uniformly from ``crop_scale``, resized back to the input size; the same window on both dates (bicubic)
  and on the mask and class map (nearest, so labels stay labels and 255 stays unlabelled). BIT's rescale by
  U(1, 1.2) followed by a crop back to the tile is a window of area 1/1.44..1. Captioning recipes refuse it:
  a crop can cut away the change the caption describes.
* **Gaussian blur** (``blur``): sigma uniform in ``blur_sigma`` pixels, images only. BIT draws one sigma per
  pair (both dates equally blurred); ``blur_per_date`` draws one per date instead, for sensors that differ.
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

import math

import torch

from ..config import AugmentConfig


def check_for_captions(cfg: AugmentConfig, recipe: str) -> None:
    """Refuse augmentations that make captions wrong."""
    if cfg.time_swap:
        raise ValueError(f"recipe {recipe!r} trains captions: data.augment.time_swap must be 0 "
                         "(swapping the dates turns 'built' into 'demolished')")
    if cfg.crop:
        raise ValueError(f"recipe {recipe!r} trains captions: data.augment.crop must be false "
                         "(a crop can cut away the change its captions describe)")


def _uniform(lo: float, hi: float, g: torch.Generator | None) -> float:
    return float(lo + (hi - lo) * torch.rand((), generator=g))


class BiTemporalAugment:
    """Callable ``item -> item`` (see the module docstring). ``enabled`` is False when it would do nothing."""

    def __init__(self, cfg: AugmentConfig, generator: torch.Generator | None = None) -> None:
        self.cfg = cfg
        self.generator = generator

    @property
    def enabled(self) -> bool:
        c = self.cfg
        return bool(c.geometric or c.crop or c.blur or c.photometric or c.time_swap)

    def _crop_window(self, h: int, w: int) -> tuple[int, int, int, int]:
        """(top, left, height, width) of a window of the image's proportions, its area fraction in crop_scale."""
        lo, hi = self.cfg.crop_scale
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"data.augment.crop_scale must satisfy 0 < lo <= hi <= 1, got {self.cfg.crop_scale}")
        side = _uniform(lo, hi, self.generator) ** 0.5
        ch, cw = max(1, round(h * side)), max(1, round(w * side))
        top = int(torch.randint(0, h - ch + 1, (), generator=self.generator))
        left = int(torch.randint(0, w - cw + 1, (), generator=self.generator))
        return top, left, ch, cw

    def _crop(self, item: dict) -> None:
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms.v2 import functional as TF

        h, w = item["before"].shape[-2:]
        window = self._crop_window(h, w)
        for key in ("before", "after"):
            item[key] = TF.resized_crop(item[key], *window, [h, w], interpolation=InterpolationMode.BICUBIC,
                                        antialias=True)
        # labels: nearest, so they stay labels (255 stays unlabelled); the "exact" variant samples the same
        # pixel centres as the bicubic image resize (plain NEAREST is half a pixel off)
        for key in ("mask", "classes"):
            t = item.get(key)
            if isinstance(t, torch.Tensor):
                item[key] = TF.resized_crop(t[None], *window, [h, w],
                                            interpolation=InterpolationMode.NEAREST_EXACT)[0]

    def _blur(self, item: dict) -> None:
        from torchvision.transforms.v2 import functional as TF

        lo, hi = self.cfg.blur_sigma
        sigma = _uniform(lo, hi, self.generator)
        for key in ("before", "after"):
            if key == "after" and self.cfg.blur_per_date:
                sigma = _uniform(lo, hi, self.generator)
            if sigma > 1e-3:  # a narrower Gaussian is the identity on a pixel grid
                k = 2 * math.ceil(3 * sigma) + 1
                item[key] = TF.gaussian_blur(item[key], [k, k], [sigma, sigma])

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
        if self.cfg.crop:
            self._crop(item)
        if self.cfg.blur:
            self._blur(item)
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
