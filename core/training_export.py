"""Turning analysts' annotations into training data, in the LEVIR-MCI layout that ``training/`` reads.

::

    OUT/images/{train,val,test}/{A,B,label}/<split>_NNNNNN.png
    OUT/LevirCCcaptions.json      official LEVIR-CC format, one record per annotation
    OUT/export.json               what was exported from where (tile size, GSD, seed, sources, counts)

Each annotation gives one chip: a square window of the aligned pair centred on it, at least one model tile
on the ground (like :func:`core.captioning.area_window`), read at the model's GSD and resampled to the tile
size. ``label`` is the change map rasterised from every annotated change polygon that falls in the chip
(class ids: building 1, road 2, vegetation 3, water 4, other/unclassified 5; 0 elsewhere); a *no change*
annotation's chip is all 0 and its caption is "there is no difference".

Splits are made **by area** so that no ground leaks from training into validation or test: chips are
grouped into spatial blocks (cells of a grid ``block_chips`` chip footprints wide, joined with every chip whose
footprint overlaps one of theirs), and whole blocks are assigned to train/val/test with seeded fractions.
The dataset is written into a temporary folder beside ``OUT`` and renamed into place when complete.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .annotations import CHANGE_CLASSES, NO_CHANGE_CAPTION, read_annotations
from .errors import ChangeScribeError, InputError
from .run_control import RunControl

CLASS_IDS = {name: i + 1 for i, name in enumerate(CHANGE_CLASSES)}  # building 1 .. other 5
UNCLASSIFIED_ID = CLASS_IDS["other"]
SPLITS = ("train", "val", "test")
CAPTIONS_FILE = "LevirCCcaptions.json"


@dataclass
class ExportSummary:
    out_dir: Path
    tile_size: int
    gsd: float | None
    counts: dict[str, int]
    skipped: int = 0
    blocks: int = 0
    footprints: dict[str, list[tuple[float, float, float, float]]] = field(default_factory=dict)

    def line(self) -> str:
        parts = ", ".join(f"{self.counts.get(s, 0)} {s}" for s in SPLITS)
        extra = f"; {self.skipped} outside the rasters skipped" if self.skipped else ""
        return (f"{sum(self.counts.values())} chips of {self.tile_size} px ({parts}) in {self.blocks} "
                f"spatial block(s){extra} -> {self.out_dir}")


def default_model_input(model: str = "default") -> tuple[int, float | None]:
    """(tile size, GSD) of a model from its card alone (no torch)."""
    from .model_file import read_card, resolve_model
    from .model_loading import DEFAULT_MODEL, model_dirs

    name = DEFAULT_MODEL if model in ("", "default") else model
    card = read_card(resolve_model(name, model_dirs()))
    inp = card.get("input", {})
    return int(inp.get("tile_size") or 256), (float(inp["gsd"]) if inp.get("gsd") else None)


def tokens(caption: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", caption.lower())


def assign_splits(footprints: list[tuple[float, float, float, float]], cell: float, seed: int = 0,
                  fractions: tuple[float, float, float] = (0.7, 0.15, 0.15)) -> tuple[list[str], int]:
    """A split per footprint (minx, miny, maxx, maxy) such that overlapping footprints, and footprints whose
    centres share a grid cell of side ``cell``, always share a split; returns (splits, number of blocks)."""
    n = len(footprints)
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def union(i: int, j: int) -> None:
        parent[find(i)] = find(j)

    cells: dict[tuple[int, int], int] = {}
    for i, (x0, y0, x1, y1) in enumerate(footprints):
        key = (int(np.floor((x0 + x1) / 2 / cell)), int(np.floor((y0 + y1) / 2 / cell)))
        if key in cells:
            union(i, cells[key])
        else:
            cells[key] = i
    for i in range(n):
        a = footprints[i]
        for j in range(i + 1, n):
            b = footprints[j]
            if a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]:
                union(i, j)
    groups: dict[int, list[int]] = {}
    for i in range(n):
        groups.setdefault(find(i), []).append(i)
    blocks = list(groups.values())
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(blocks))
    frac = np.asarray(fractions, float)
    frac = frac / frac.sum()
    target = frac * n
    have = np.zeros(3)
    out = [""] * n
    for b in order:
        members = blocks[b]
        deficit = np.where(frac > 0, target - have, -np.inf)
        k = int(np.argmax(deficit))
        have[k] += len(members)
        for i in members:
            out[i] = SPLITS[k]
    return out, len(blocks)


def _write_png(path: Path, arr: np.ndarray) -> None:
    from PIL import Image

    Image.fromarray(arr).save(path, optimize=False, compress_level=1)


def _chip_rgb(arr: np.ndarray, size: int) -> np.ndarray:
    """(bands, h, w) float 0..255 -> (size, size, 3) uint8, area-averaged or bilinear to ``size``."""
    from PIL import Image

    img = np.clip(np.round(arr[:3]), 0, 255).astype(np.uint8).transpose(1, 2, 0)
    if img.shape[0] != size or img.shape[1] != size:
        shrink = img.shape[0] > size
        img = np.asarray(Image.fromarray(img).resize((size, size), Image.BOX if shrink else Image.BILINEAR))
    return np.ascontiguousarray(img)


def export_training_data(annotations: str | os.PathLike, before: str | os.PathLike, after: str | os.PathLike,
                         out_dir: str | os.PathLike, tile_size: int | None = None, gsd: float | None = None,
                         seed: int = 0, fractions: tuple[float, float, float] = (0.7, 0.15, 0.15),
                         block_chips: float = 2.0, control: RunControl | None = None,
                         model: str = "default") -> ExportSummary:
    """Export an annotation store + its before/after rasters as a LEVIR-MCI dataset at ``out_dir``.

    ``tile_size``/``gsd`` of None (or 0) take the model's. ``out_dir`` must not exist, be empty, or be an
    earlier export (which is replaced only once the new one is complete).
    """
    import rasterio
    from rasterio.features import rasterize
    from rasterio.transform import Affine
    from rasterio.windows import transform as window_transform
    from shapely.geometry import box

    from .captioning import area_window
    from .raster_pair import AlignedPair

    control = control or RunControl()
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise InputError(f"output {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / CAPTIONS_FILE).exists():
        raise InputError(f"output folder {out} is not empty and holds no earlier export; choose an empty folder")
    if not tile_size or not gsd:
        m_tile, m_gsd = default_model_input(model)
        tile_size = int(tile_size or m_tile)
        gsd = float(gsd) if gsd else m_gsd
    if tile_size < 8:
        raise InputError(f"tile size {tile_size} is too small")
    anns = read_annotations(annotations)
    if not len(anns):
        raise InputError(f"{annotations} holds no annotations to export")
    if any(s < 0 for s in fractions) or sum(fractions) <= 0:
        raise InputError(f"split fractions must be non-negative and not all zero, got {fractions}")
    control.progress(0.0, "opening the rasters")
    with AlignedPair(before, after, target_gsd=gsd) as pair:
        if anns.crs is None:
            raise InputError(f"{annotations} has no CRS")
        anns = anns.to_crs(pair.grid.crs.to_wkt())
        grid_box = box(*pair.grid.bounds)
        anns = anns[anns.geometry.notna() & ~anns.geometry.is_empty].reset_index(drop=True)
        inside = anns.geometry.intersects(grid_box)
        skipped = int((~inside).sum())
        anns = anns[inside].reset_index(drop=True)
        if not len(anns):
            raise InputError("no annotation overlaps the two rasters")
        windows = [area_window(pair, g.bounds, tile_size) for g in anns.geometry]
        feet = [rasterio.windows.bounds(w, pair.grid.transform) for w in windows]
        footprint_m = tile_size * pair.grid.res[0]
        splits, n_blocks = assign_splits(feet, block_chips * footprint_m, seed, fractions)
        shapes = [(g, CLASS_IDS.get(c or "", UNCLASSIFIED_ID))
                  for g, c, nc in zip(anns.geometry, anns["change_class"], anns["no_change"]) if not nc]
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
        try:
            for s in SPLITS:
                for sub in ("A", "B", "label"):
                    (tmp / "images" / s / sub).mkdir(parents=True)
            records, counts = [], {s: 0 for s in SPLITS}
            footprints: dict[str, list] = {s: [] for s in SPLITS}
            for i, (row, win, split) in enumerate(zip(anns.itertuples(index=False), windows, splits)):
                control.check()
                name = f"{split}_{counts[split]:06d}.png"
                counts[split] += 1
                footprints[split].append(tuple(float(v) for v in feet[i]))
                b, a, _valid = pair.read(win)
                d = tmp / "images" / split
                _write_png(d / "A" / name, _chip_rgb(b, tile_size))
                _write_png(d / "B" / name, _chip_rgb(a, tile_size))
                if row.no_change:
                    label = np.zeros((tile_size, tile_size), np.uint8)
                else:
                    t = window_transform(win, pair.grid.transform) * Affine.scale(win.width / tile_size,
                                                                                    win.height / tile_size)
                    chip_box = box(*feet[i])
                    mine = [(g, v) for g, v in shapes if g.intersects(chip_box)]
                    # larger polygons first, so a small annotation inside a big one keeps its class
                    mine.sort(key=lambda gv: -gv[0].area)
                    label = rasterize(mine, out_shape=(tile_size, tile_size), transform=t, fill=0,
                                      dtype="uint8") if mine else np.zeros((tile_size, tile_size), np.uint8)
                _write_png(d / "label" / name, label)
                caption = NO_CHANGE_CAPTION if row.no_change else (row.caption or row.suggested_caption or "")
                if not caption.strip():
                    caption = "something has changed"
                toks = tokens(caption)
                records.append({"filename": name, "filepath": split, "split": split, "imgid": i,
                                "sentences": [{"tokens": toks, "raw": " " + " ".join(toks) + " .", "imgid": i,
                                               "sentid": i}],
                                "changeflag": 0 if row.no_change else 1, "sentids": [i]})
                control.progress((i + 1) / len(anns), "writing chips")
            (tmp / CAPTIONS_FILE).write_text(json.dumps({"images": records}), encoding="utf-8")
            meta = {"format": "LEVIR-MCI", "tile_size": tile_size, "gsd": gsd, "seed": seed,
                    "fractions": list(fractions), "block_chips": block_chips, "annotations": str(annotations),
                    "before": str(before), "after": str(after), "crs": pair.grid.crs.to_string(),
                    "counts": counts, "blocks": n_blocks, "skipped": skipped,
                    "classes": {str(v): k for k, v in CLASS_IDS.items()}, "footprints": footprints}
            (tmp / "export.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")
            control.check()
            _move_into_place(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return ExportSummary(out, tile_size, gsd, counts, skipped, n_blocks, footprints)


def _move_into_place(tmp: Path, out: Path) -> None:
    """Rename the finished export to ``out``; an empty folder or an earlier export there is replaced."""
    if out.is_dir():
        if not any(out.iterdir()):
            out.rmdir()
            os.replace(tmp, out)
            return
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
        old.rmdir()
        os.replace(out, old)
        try:
            os.replace(tmp, out)
        except BaseException:
            os.replace(old, out)
            raise
        shutil.rmtree(old, ignore_errors=True)
        return
    os.replace(tmp, out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m changescribe.core.training_export",
                                 description="Export an annotation store and its rasters as a LEVIR-MCI dataset.")
    ap.add_argument("annotations", help="the annotation GeoPackage")
    ap.add_argument("before")
    ap.add_argument("after")
    ap.add_argument("out_dir")
    ap.add_argument("--tile-size", type=int, default=0, help="chip size in px (default: the model's)")
    ap.add_argument("--gsd", type=float, default=0.0, help="chip GSD in m (default: the model's)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the split assignment")
    ap.add_argument("--fractions", default="0.7,0.15,0.15", help="train,val,test fractions")
    ap.add_argument("--block-chips", type=float, default=2.0, help="spatial block side in chip footprints")
    ap.add_argument("--model", default="default", help="model whose tile size/GSD are the defaults")
    a = ap.parse_args(argv)
    try:
        fr = tuple(float(v) for v in a.fractions.split(","))
        if len(fr) != 3:
            raise ValueError
    except ValueError:
        ap.error("--fractions takes three numbers, e.g. 0.7,0.15,0.15")
    try:
        summary = export_training_data(a.annotations, a.before, a.after, a.out_dir, a.tile_size, a.gsd, a.seed,
                                       fr, a.block_chips, model=a.model)
    except ChangeScribeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(summary.line())
    return 0


if __name__ == "__main__":
    sys.exit(main())
