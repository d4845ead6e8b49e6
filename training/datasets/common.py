"""What every training dataset returns, and the small helpers the readers share.

An item is a dict::

    {"before": uint8 (3, H, W), "after": uint8 (3, H, W),
     "mask": uint8 (H, W) in {0, 1}, or filled with IGNORE (255) where the source has no mask,
     "captions": list[str] (may be empty), "name": str}

Readers may add keys (LEVIR-MCI: ``"classes"``, the multi-class label map). Masks are never ``None`` so
batches always stack; losses and metrics ignore 255 pixels.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

IGNORE = 255
IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg")


def read_rgb(path: str | Path) -> torch.Tensor:
    """An image file -> uint8 (3, H, W). Grey images are repeated, alpha is dropped."""
    from PIL import Image

    with Image.open(path) as im:
        arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))


def read_label(path: str | Path) -> np.ndarray:
    """A single-band label image -> uint8 (H, W) with its values as stored (RGB labels: the first band)."""
    from PIL import Image

    with Image.open(path) as im:
        if im.mode in ("RGB", "RGBA"):
            im = im.getchannel(0)
        elif im.mode not in ("L", "P", "1"):
            im = im.convert("L")
        arr = np.asarray(im)
    return np.ascontiguousarray(arr.astype(np.uint8))


def binary_mask(label: np.ndarray) -> torch.Tensor:
    """Any label with 0 = no change and non-zero = change ({0,255} LEVIR-CD, class ids LEVIR-MCI) -> {0,1}."""
    return torch.from_numpy((label > 0).astype(np.uint8))


def ignore_mask(h: int, w: int) -> torch.Tensor:
    return torch.full((h, w), IGNORE, dtype=torch.uint8)


def image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if folder.is_dir() else []


def find_image(folder: Path, name: str) -> Path | None:
    """``folder/name``, or the same stem with another image suffix (LEVIR-CC names end .png)."""
    p = folder / name
    if p.is_file():
        return p
    for suffix in IMAGE_SUFFIXES:
        q = folder / (Path(name).stem + suffix)
        if q.is_file():
            return q
    return None


def collate(items: list[dict]) -> dict:
    """Stack tensors, keep lists (captions, names) as lists."""
    out: dict = {}
    for key in items[0]:
        values = [i[key] for i in items]
        out[key] = torch.stack(values) if isinstance(values[0], torch.Tensor) else values
    return out
