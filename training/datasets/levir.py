"""Readers for the LEVIR family in their official layouts: LEVIR-CC, LEVIR-MCI and LEVIR-CD.

LEVIR-CC (Liu et al., TGRS 2022)::

    ROOT/images/{train,val,test}/{A,B}/<split>_NNNNNN.png      256 x 256 RGB, A = before, B = after
    ROOT/LevirCCcaptions.json                                   {"images": [{"filename", "filepath", "split",
                                                                  "imgid", "sentences": [{"tokens", "raw", ...}],
                                                                  "changeflag", "sentids"}]}

The caption file may also be ChangeScribe's converted ``levircc_captions.json`` (same records, each sentence a
plain string; a bare list of records works too). Official splits: 6,815 train / 1,333 val / 1,929 test.
Images are looked up in ``ROOT/images/<split>/A``, then ``ROOT/<split>/A``, then ``ROOT/A`` (a flat folder of
sample pairs: LEVIR-CC file names carry their split, so they cannot collide).

LEVIR-MCI (Liu et al., Change-Agent, 2024) is LEVIR-CC plus ``ROOT/images/<split>/label/<name>.png`` change
maps: 0 = no change, non-zero = a change class (roads, buildings). The change-detection branch sees the binary
``mask`` (non-zero -> 1); the class map stays available as ``item["classes"]``. **The analysts' annotation
export writes exactly this layout**, so :class:`LevirMCIDataset` is also the reader for exported annotations.

LEVIR-CD (Chen & Shi, Remote Sensing 2020)::

    ROOT/{train,val,test}/{A,B,label}/<name>.png                1024 x 1024 RGB, label {0, 255}

cut into non-overlapping ``crop_size`` crops in a fixed order (file name, then row, then column), named
``<stem>_<row>_<col>`` like BIT's samples (``train_36_0512_0512``). With ``crop_size`` equal to the image size
(or None) whole images are read, which is how already-cut crops (BIT's 256 px samples) are used. ``split=None``
reads ``ROOT/{A,B,label}`` directly.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset

from .common import binary_mask, find_image, ignore_mask, image_files, read_label, read_rgb

log = logging.getLogger(__name__)

CAPTIONS_FILE = "LevirCCcaptions.json"


@dataclass(frozen=True)
class CaptionRecord:
    """One LEVIR-CC pair as the caption file describes it."""

    filename: str
    split: str
    captions: tuple[str, ...]
    changeflag: int | None = None
    imgid: int | None = None
    folder: str | None = None  # the official "filepath" (the split folder)


def _sentence(s) -> str:
    if isinstance(s, dict):  # official: {"tokens": [...], "raw": " ... .", "imgid", "sentid"}
        tokens = s.get("tokens")
        return " ".join(tokens) if tokens else str(s.get("raw", "")).strip()
    return str(s).strip()


def read_captions(path: str | Path) -> list[CaptionRecord]:
    """Every record of a LEVIR-CC caption file (official ``LevirCCcaptions.json`` or the converted one)."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    records = data["images"] if isinstance(data, dict) else data
    out = []
    for r in records:
        split = r.get("split") or r.get("filepath")
        if not split or "filename" not in r:
            raise ValueError(f"{path}: a record without filename/split: {str(r)[:120]}")
        flag = r.get("changeflag")
        out.append(CaptionRecord(r["filename"], split, tuple(_sentence(s) for s in r.get("sentences", [])),
                                 None if flag is None else int(flag), r.get("imgid"), r.get("filepath")))
    return out


def split_counts(records: list[CaptionRecord]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for r in records:
        counts[r.split] = counts.get(r.split, 0) + 1
    return counts


def levircc_images_dir(root: Path, split: str) -> Path:
    """The folder holding ``A/`` and ``B/`` for a split (see the module docstring for the order)."""
    for d in (root / "images" / split, root / split, root):
        if (d / "A").is_dir():
            return d
    return root / "images" / split


class LevirCCDataset(Dataset):
    """LEVIR-CC pairs of one split with their five captions.

    ``masks``: None (masks are 255 = unlabelled), ``"label"`` (LEVIR-MCI: ``images/<split>/label``), or a
    folder of pseudo-labels as the pseudo-labels step writes them (``<folder>/<split>/<name>.png``, {0,255}).
    ``missing="skip"`` drops records whose images (or masks) are not on disk; the default raises.
    """

    def __init__(self, root: str | Path, split: str = "train", captions: str | Path | None = None,
                 masks: str | Path | None = None, limit: int | None = None, missing: str = "error") -> None:
        if missing not in ("error", "skip"):
            raise ValueError(f"missing must be 'error' or 'skip', got {missing!r}")
        self.root = Path(root)
        self.split = split
        self.captions_path = Path(captions) if captions else self.root / CAPTIONS_FILE
        if not self.captions_path.is_file():
            raise FileNotFoundError(f"LEVIR-CC caption file {self.captions_path} not found")
        self.masks = masks
        records = [r for r in read_captions(self.captions_path) if r.split == split]
        self.items: list[tuple[CaptionRecord, Path, Path, Path | None]] = []
        dropped = 0
        for r in records:
            d = levircc_images_dir(self.root, r.folder or r.split)
            a, b = find_image(d / "A", r.filename), find_image(d / "B", r.filename)
            m = self._mask_path(d, r) if masks is not None else None
            absent = [str(q / r.filename) for p, q in ((a, d / "A"), (b, d / "B")) if p is None]
            if masks is not None and m is None:
                absent.append(f"mask of {r.filename}")
            if absent:
                if missing == "error":
                    raise FileNotFoundError(f"LEVIR-CC {split} pair {r.filename}: not found in {d} "
                                            f"({', '.join(absent)}); use missing='skip' for a partial copy")
                dropped += 1
                continue
            self.items.append((r, a, b, m))
            if limit is not None and len(self.items) >= limit:
                break
        if dropped:
            log.info("LEVIR-CC %s: %d of %d pairs are not on disk, skipped", split, dropped, len(records))

    def _mask_path(self, images_dir: Path, r: CaptionRecord) -> Path | None:
        if str(self.masks) == "label":
            return find_image(images_dir / "label", r.filename)
        return find_image(Path(self.masks) / r.split, r.filename)

    @property
    def captions(self) -> list[list[str]]:
        return [list(r.captions) for r, *_ in self.items]

    @property
    def names(self) -> list[str]:
        return [r.filename for r, *_ in self.items]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        r, a, b, m = self.items[i]
        before, after = read_rgb(a), read_rgb(b)
        item = {"before": before, "after": after, "captions": list(r.captions), "name": Path(r.filename).stem}
        if m is None:
            item["mask"] = ignore_mask(*before.shape[-2:])
        else:
            label = read_label(m)
            item["mask"] = binary_mask(label)
            if str(self.masks) == "label":
                item["classes"] = torch.from_numpy(label)
        return item


class LevirMCIDataset(LevirCCDataset):
    """LEVIR-MCI: LEVIR-CC + ``images/<split>/label`` change maps (binary ``mask`` + ``classes``).

    ChangeScribe's annotation export writes this layout, so this class also reads analysts' annotations.
    """

    def __init__(self, root: str | Path, split: str = "train", captions: str | Path | None = None,
                 limit: int | None = None, missing: str = "error") -> None:
        super().__init__(root, split, captions, masks="label", limit=limit, missing=missing)


class LevirCDDataset(Dataset):
    """LEVIR-CD pairs cut into non-overlapping ``crop_size`` crops (no captions)."""

    def __init__(self, root: str | Path, split: str | None = "train", crop_size: int | None = 256,
                 limit: int | None = None) -> None:
        from PIL import Image

        self.root = Path(root)
        self.dir = self.root / split if split else self.root
        files = image_files(self.dir / "A")
        if not files:
            raise FileNotFoundError(f"LEVIR-CD: no images in {self.dir / 'A'}")
        self.crop_size = crop_size
        self.items: list[tuple[Path, Path, Path, int, int, int, str]] = []
        for a in files:
            b, lab = find_image(self.dir / "B", a.name), find_image(self.dir / "label", a.name)
            if b is None or lab is None:
                raise FileNotFoundError(f"LEVIR-CD pair {a.name}: B or label missing in {self.dir}")
            with Image.open(a) as im:
                w, h = im.size
            cs = crop_size or max(h, w)
            if cs >= h and cs >= w:
                self.items.append((a, b, lab, 0, 0, 0, a.stem))
            else:
                for r in range(0, h - cs + 1, cs):
                    for c in range(0, w - cs + 1, cs):
                        self.items.append((a, b, lab, r, c, cs, f"{a.stem}_{r:04d}_{c:04d}"))
            if limit is not None and len(self.items) >= limit:
                del self.items[limit:]
                break
        self._cache: tuple[Path, tuple] | None = None  # the last whole image (crops are read in order)

    def __len__(self) -> int:
        return len(self.items)

    def _load(self, a: Path, b: Path, lab: Path) -> tuple:
        if self._cache is None or self._cache[0] != a:
            self._cache = (a, (read_rgb(a), read_rgb(b), binary_mask(read_label(lab))))
        return self._cache[1]

    def __getitem__(self, i: int) -> dict:
        a, b, lab, r, c, cs, name = self.items[i]
        before, after, mask = self._load(a, b, lab)
        if cs:
            before, after = before[:, r:r + cs, c:c + cs], after[:, r:r + cs, c:c + cs]
            mask = mask[r:r + cs, c:c + cs]
        return {"before": before.clone(), "after": after.clone(), "mask": mask.clone(), "captions": [],
                "name": name}
