"""Change pairs synthesised on REAL imagery, for a change model that works on real scenes without bi-temporal labels.

The levers (Self-Pair, Seo et al. WACV 2023; STAR/ChangeStar, Zheng et al. ICCV 2021; Changen, ICCV 2023):

* **Object pasting.** Real buildings are cut out of real images along their footprints (a vector layer of
  polygons, rasterised on the image's own grid) and pasted into a real background crop. One date gets the
  objects, the other does not: pasted into *after* the pair shows new buildings; pasted into *before*, buildings
  that were removed. The label is exactly the pasted pixels. Everything already in the background (unlabelled
  buildings, roads, trees) is in both dates, so it is correctly "no change".
* **Same objects in both dates** (a seam in both images is not a change) and **STAR pairs**: two crops of
  labelled imagery, label = XOR of their footprint masks.
* **Nuisances, never labelled:** illumination and colour (per-band gain, gamma, contrast, saturation: sensor
  and sun), vegetation phenology (greenness of vegetated pixels up or down), land-cover patches of other real
  ground pasted in (fields, soil, grass: not a building change), sub-pixel misregistration, blur, noise, JPEG,
  and black or white fill strips at an image edge. A nuisance-only pair has an empty label.

Geometry is identical in both dates up to the simulated misregistration, and the label follows the date that
holds the objects. Items are drawn from ``seed`` and the index alone, so an index always gives the same pair
(held-out splits are disjoint seed ranges; a resumed run sees the same data).

Captions are LEVIR-CC-style sentences built from what was synthesised ("some houses are built on the left").
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage
from torch.utils.data import Dataset

from changescribe.core.annotations import NO_CHANGE_CAPTIONS

from .common import IMAGE_SUFFIXES

__all__ = ["ObjectCut", "RealScenes", "RealChangeDataset", "RandomCrops", "load_real_scenes", "cut_objects",
           "nuisance"]


@dataclass(frozen=True)
class ObjectCut:
    """One real object: its pixels (h, w, 3) uint8 and its mask (h, w) bool, cut at its bounding box."""

    image: np.ndarray
    mask: np.ndarray


@dataclass
class RealScenes:
    """Real images to synthesise from: labelled ones (with an object mask) and unlabelled backgrounds."""

    labelled: list[tuple[np.ndarray, np.ndarray]]  # (H, W, 3) uint8, (H, W) bool object mask
    backgrounds: list[np.ndarray]                   # (H, W, 3) uint8
    objects: list[ObjectCut]


def _read_image(path: Path) -> tuple[np.ndarray, object, object]:
    """(H, W, 3) uint8 RGB, plus the georeference (transform, crs) when the file has one."""
    import rasterio

    with rasterio.open(path) as ds:
        if ds.count < 3:
            raise ValueError(f"{path}: {ds.count} band(s); real-change synthesis needs RGB")
        arr = ds.read([1, 2, 3])
        if arr.dtype != np.uint8:
            raise ValueError(f"{path}: {arr.dtype} pixels; real-change synthesis reads 8-bit RGB")
        return np.ascontiguousarray(arr.transpose(1, 2, 0)), ds.transform, ds.crs


def footprint_mask(image_path: str | Path, footprints: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """An image and its object mask: the footprint polygons rasterised on the image's own grid."""
    import geopandas as gpd
    from rasterio import features

    arr, transform, crs = _read_image(Path(image_path))
    if crs is None:
        raise ValueError(f"{image_path} has no CRS: footprints cannot be placed on it")
    shapes = gpd.read_file(footprints).to_crs(crs).geometry
    mask = features.rasterize([(g, 1) for g in shapes if g is not None and not g.is_empty],
                              out_shape=arr.shape[:2], transform=transform, fill=0, dtype="uint8")
    return arr, mask.astype(bool)


def cut_objects(image: np.ndarray, mask: np.ndarray, min_pixels: int = 40, max_side: int = 96) -> list[ObjectCut]:
    """Each connected object of ``mask`` that lies wholly inside the image, cut at its bounding box."""
    labels, n = ndimage.label(mask)
    cuts = []
    h, w = mask.shape
    for i, sl in enumerate(ndimage.find_objects(labels), start=1):
        if sl is None:
            continue
        ys, xs = sl
        if ys.start == 0 or xs.start == 0 or ys.stop == h or xs.stop == w:
            continue  # cut by the image edge: not a whole object
        m = labels[sl] == i
        if m.sum() < min_pixels or max(m.shape) > max_side:
            continue
        cuts.append(ObjectCut(image[sl].copy(), m))
    return cuts


def load_real_scenes(labelled: list[dict], backgrounds: list[str]) -> RealScenes:
    """``labelled``: [{"image": raster, "footprints": vector}], ``backgrounds``: image files or folders (PNG,
    GeoTIFF, ...; a folder is searched recursively)."""
    pairs = [footprint_mask(item["image"], item["footprints"]) for item in labelled]
    images = []
    for entry in backgrounds:
        p = Path(entry)
        files = sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES) if p.is_dir() else [p]
        if not files:
            raise ValueError(f"background {entry}: no image found")
        images += [_read_image(f)[0] for f in files]
    objects = [cut for img, m in pairs for cut in cut_objects(img, m)]
    if not objects:
        raise ValueError("real-change synthesis: the labelled images hold no whole object to paste")
    return RealScenes(pairs, [img for img, _ in pairs] + images, objects)


# ---- photometry --------------------------------------------------------------------------------------------------
def excess_green(img: np.ndarray) -> np.ndarray:
    """ExG = 2g - r - b on chromatic coordinates: an RGB vegetation index (Woebbecke et al. 1995)."""
    f = img.astype(np.float32) + 1.0
    s = f.sum(-1)
    return (2 * f[..., 1] - f[..., 0] - f[..., 2]) / s


def nuisance(img: np.ndarray, rng: np.random.Generator, strength: float = 1.0) -> np.ndarray:
    """One acquisition's look: illumination, sensor colour, phenology, blur, noise, JPEG (geometry unchanged)."""
    f = img.astype(np.float32) / 255.0
    s = strength
    if rng.random() < 0.8:  # sensor colour and sun: per-band gain, gamma, contrast, saturation
        f = f * rng.uniform(1 - 0.15 * s, 1 + 0.15 * s, 3).astype(np.float32)
        f = np.clip(f, 0, 1) ** rng.uniform(1 - 0.25 * s, 1 + 0.3 * s)
        mean = f.mean((0, 1), keepdims=True)
        f = mean + (f - mean) * rng.uniform(1 - 0.25 * s, 1 + 0.2 * s)
        grey = f.mean(-1, keepdims=True)
        f = grey + (f - grey) * rng.uniform(1 - 0.4 * s, 1 + 0.3 * s)
    if rng.random() < 0.5:  # phenology: vegetated pixels greener or browner
        veg = np.clip((excess_green(img) - 0.02) / 0.08, 0, 1)[..., None]
        shift = rng.uniform(-0.12, 0.08) * s
        f = f + veg * np.array([-shift * 0.6, shift, -shift * 0.4], np.float32)
    if rng.random() < 0.4:
        sigma = rng.uniform(0.3, 1.2) * s
        f = ndimage.gaussian_filter(f, (sigma, sigma, 0))
    if rng.random() < 0.4:
        f = f + rng.normal(0, rng.uniform(0.005, 0.025) * s, f.shape).astype(np.float32)
    out = (np.clip(f, 0, 1) * 255 + 0.5).astype(np.uint8)
    if rng.random() < 0.4:  # JPEG
        from PIL import Image

        buf = io.BytesIO()
        Image.fromarray(out).save(buf, "JPEG", quality=int(rng.integers(35, 92)))
        out = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB")).copy()
    return out


def shift_subpixel(img: np.ndarray, dy: float, dx: float, order: int = 1) -> np.ndarray:
    """Misregistration: ``img`` moved by (dy, dx) pixels, edges repeated."""
    if img.ndim == 3:
        return ndimage.shift(img.astype(np.float32), (dy, dx, 0), order=order, mode="nearest").round().clip(
            0, 255).astype(np.uint8)
    return ndimage.shift(img.astype(np.float32), (dy, dx), order=0, mode="nearest") > 0.5


# ---- the dataset -----------------------------------------------------------------------------------------------
MODES = ("new", "removed", "both", "star", "none")


@dataclass(frozen=True)
class SynthesisConfig:
    """Mixing probabilities of the pair kinds and the nuisance strength."""

    p_new: float = 0.40       # objects pasted into the after date
    p_removed: float = 0.15   # objects pasted into the before date
    p_both: float = 0.10      # some objects in both dates (no change), others in one
    p_star: float = 0.10      # two different labelled crops, label = XOR of their object masks
    p_land: float = 0.35      # a land-cover patch (never labelled) in one date, in any pair kind
    p_site: float = 0.5       # new/removed objects stand on ground that changed too (a building site, never labelled)
    p_fill: float = 0.10      # a black or white fill strip at one edge of one date (never labelled)
    p_shift: float = 0.6      # sub-pixel misregistration of one date
    p_shadow: float = 0.7     # pasted objects cast a shadow (one sun direction per pair)
    nuisance: float = 1.0     # strength of the photometric nuisances (0: none)
    max_objects: int = 14


class RealChangeDataset(Dataset):
    """``count`` synthetic change pairs of ``size``² px on real imagery, from ``seed`` onwards (see module doc)."""

    def __init__(self, scenes: RealScenes, count: int, size: int = 256, seed: int = 0,
                 config: SynthesisConfig | None = None, object_scale: float = 1.0) -> None:
        """``object_scale``: the objects' GSD over the target GSD (Joplin's 0.6 m objects at 0.5 m: 1.2)."""
        self.scenes, self.count, self.size, self.seed = scenes, count, size, seed
        self.object_scale = object_scale
        self.cfg = config or SynthesisConfig()
        self.star_sources = [(img, m) for img, m in scenes.labelled if min(img.shape[:2]) >= size]

    def __len__(self) -> int:
        return self.count

    def _crop(self, img: np.ndarray, rng: np.random.Generator, mask: np.ndarray | None = None):
        """A random square crop at a random scale (GSD 0.7-1.4x), random flip/rot90; the mask follows."""
        s = self.size
        scale = rng.uniform(0.75, 1.35)
        side = min(int(round(s * scale)), *img.shape[:2])
        y, x = rng.integers(0, img.shape[0] - side + 1), rng.integers(0, img.shape[1] - side + 1)
        crop = img[y:y + side, x:x + side]
        m = None if mask is None else mask[y:y + side, x:x + side]
        if side != s:
            z = s / side
            crop = ndimage.zoom(crop, (z, z, 1), order=1)[:s, :s]
            m = None if m is None else ndimage.zoom(m.astype(np.uint8), z, order=0)[:s, :s].astype(bool)
        k, flip = int(rng.integers(4)), bool(rng.integers(2))
        crop = np.rot90(crop, k)
        m = None if m is None else np.rot90(m, k)
        if flip:
            crop, m = crop[:, ::-1], (None if m is None else m[:, ::-1])
        return np.ascontiguousarray(crop), (None if m is None else np.ascontiguousarray(m))

    def _object(self, rng: np.random.Generator) -> ObjectCut:
        cut = self.scenes.objects[int(rng.integers(len(self.scenes.objects)))]
        img, m = cut.image, cut.mask
        k = int(rng.integers(4))
        img, m = np.rot90(img, k), np.rot90(m, k)
        if rng.integers(2):
            img, m = img[:, ::-1], m[:, ::-1]
        z = self.object_scale * rng.uniform(0.8, 1.3)
        img = ndimage.zoom(np.ascontiguousarray(img), (z, z, 1), order=1)
        m = ndimage.zoom(np.ascontiguousarray(m).astype(np.uint8), z, order=0).astype(bool)
        if rng.random() < 0.5:  # roof colour varies from house to house
            f = img.astype(np.float32) * rng.uniform(0.75, 1.25, 3).astype(np.float32)
            img = np.clip(f, 0, 255).astype(np.uint8)
        return ObjectCut(img, m)

    def _paste(self, canvas: np.ndarray, occupied: np.ndarray, obj: ObjectCut, rng: np.random.Generator,
               shadow: tuple[int, int], row: list[float] | None = None) -> tuple[np.ndarray, np.ndarray] | None:
        """Paste ``obj`` where it overlaps nothing pasted before; returns its mask on the canvas and every pixel
        the paste touched (the object and its shadow), or None when it found no room."""
        s = self.size
        h, w = obj.mask.shape
        if h >= s or w >= s:
            return None
        for attempt in range(8):
            if row is not None and attempt < 3:  # the next house of a row: one step further along the street
                y, x = int(round(row[0])), int(round(row[1]))
                row[0] += row[2] * (max(h, w) + row[4])
                row[1] += row[3] * (max(h, w) + row[4])
                if not (0 <= y < s - h and 0 <= x < s - w):
                    continue
            else:
                y, x = int(rng.integers(0, s - h)), int(rng.integers(0, s - w))
            grown = ndimage.binary_dilation(obj.mask, iterations=3)
            if occupied[y:y + h, x:x + w][grown].any():
                continue
            full = np.zeros((s, s), bool)
            full[y:y + h, x:x + w] = obj.mask
            sh = np.roll(full, shadow, (0, 1)) & ~full if any(shadow) else np.zeros_like(full)
            # the object's shadow falls on the ground beside it (darkened, never labelled)
            canvas[sh] = (canvas[sh].astype(np.float32) * rng.uniform(0.45, 0.7)).astype(np.uint8)
            canvas[full] = obj.image[obj.mask]
            occupied |= full | sh
            return full, full | sh
        return None

    def _land_patch(self, canvas: np.ndarray, rng: np.random.Generator, share: tuple[float, float] = (0.05, 0.3)) -> None:
        """Other real ground pasted in a blob covering ``share`` of the tile (a field ploughed, grass cut, soil
        exposed, a building site): not a building change. The ground comes from the labelled images, less their
        buildings (an unlabelled background could bring in houses that would then be taught as no change)."""
        image, objects = self.scenes.labelled[int(rng.integers(len(self.scenes.labelled)))]
        donor, donor_objects = self._crop(image, rng, objects)
        noise = ndimage.gaussian_filter(rng.standard_normal((self.size, self.size)), rng.uniform(6, 20))
        blob = noise > np.quantile(noise, 1 - rng.uniform(*share))
        blob &= ~ndimage.binary_dilation(donor_objects, iterations=3)
        canvas[blob] = donor[blob]

    def __getitem__(self, i: int) -> dict:
        rng = np.random.default_rng([self.seed, i])
        c, s = self.cfg, self.size
        u = rng.random()
        cuts = np.cumsum([c.p_new, c.p_removed, c.p_both, c.p_star])
        mode = MODES[int(np.searchsorted(cuts, u, side="right"))] if u < cuts[-1] else "none"
        if mode == "star" and not self.star_sources:
            mode = "new"
        label = np.zeros((s, s), bool)
        n_new = n_gone = 0
        if mode == "star":
            (a_img, a_m), (b_img, b_m) = (self._crop(img, rng, m) for img, m in
                                          (self.star_sources[int(j)] for j in rng.integers(len(self.star_sources), size=2)))
            before, after, label = a_img, b_img, a_m ^ b_m
            n_new = int(ndimage.label(b_m & ~a_m)[1])  # buildings of the after date only: built
            n_gone = int(ndimage.label(a_m & ~b_m)[1])  # of the before date only: removed
        else:
            base, _ = self._crop(self.scenes.backgrounds[int(rng.integers(len(self.scenes.backgrounds)))], rng)
            before, after = base.copy(), base.copy()
            occupied = np.zeros((s, s), bool)
            shadow = tuple(int(v) for v in rng.integers(-4, 5, 2)) if rng.random() < c.p_shadow else (0, 0)
            if mode != "none" or rng.random() < 0.5:
                n = int(rng.integers(1, c.max_objects + 1)) if rng.random() < 0.5 else int(rng.integers(1, 5))
                row = None
                if n >= 4 and rng.random() < 0.6:  # a row of houses along a new street
                    angle = rng.uniform(0, np.pi)
                    row = [rng.uniform(0, s * 0.5), rng.uniform(0, s * 0.5), np.sin(angle), np.cos(angle),
                           rng.uniform(2, 10)]
                if mode in ("new", "removed") and rng.random() < c.p_site:
                    # the ground of a new subdivision changes as well (soil, lawns, driveways): only houses count
                    self._land_patch(before if mode == "removed" else after, rng, (0.3, 0.8))
                for k in range(n):
                    obj = self._object(rng)
                    if mode == "both" and k % 2 == 0 or mode == "none":  # the same object in both dates
                        pasted = self._paste(before, occupied, obj, rng, shadow)
                        if pasted is not None:
                            after[pasted[1]] = before[pasted[1]]
                        continue
                    pasted = self._paste(before if mode == "removed" else after, occupied, obj, rng, shadow, row)
                    if pasted is not None:
                        label |= pasted[0]
                        n_new += 1
        # misregistration: the date without labelled objects moves by a sub-pixel amount
        if rng.random() < c.p_shift:
            dy, dx = rng.uniform(-1.2, 1.2, 2)
            if mode == "removed":
                after = shift_subpixel(after, dy, dx)
            else:
                before = shift_subpixel(before, dy, dx)
        if rng.random() < c.p_land:
            self._land_patch(after if rng.integers(2) else before, rng)
        if c.nuisance > 0:
            before, after = nuisance(before, rng, c.nuisance), nuisance(after, rng, c.nuisance)
        if rng.random() < c.p_fill:  # a no-data strip of a mosaic or warped export in one date
            width = int(rng.integers(4, s // 4))
            value = 0 if rng.random() < 0.7 else 255
            target = after if rng.integers(2) else before
            side = int(rng.integers(4))
            strip = np.zeros((s, s), bool)
            strip[:, :width] = True
            strip = np.rot90(strip, side)
            target[strip] = value
            label[strip] = False
        caps = captions_for(mode, int(label.sum()), n_new, label, n_gone)
        return {"before": torch.from_numpy(np.ascontiguousarray(before.transpose(2, 0, 1))),
                "after": torch.from_numpy(np.ascontiguousarray(after.transpose(2, 0, 1))),
                "mask": torch.from_numpy(label.astype(np.uint8)), "captions": caps,
                "name": f"real_change_{mode}_{self.seed}_{i}"}


def _where(label: np.ndarray) -> str:
    """LEVIR-CC-style position words for the changed pixels of a tile."""
    ys, xs = np.nonzero(label)
    h, w = label.shape
    cy, cx = ys.mean() / h, xs.mean() / w
    spread = max(ys.std() / h, xs.std() / w)
    if spread > 0.28:
        return ""
    v = "top" if cy < 0.35 else "bottom" if cy > 0.65 else ""
    hz = "left" if cx < 0.35 else "right" if cx > 0.65 else ""
    if v and hz:
        return f" in the {v} {hz} corner"
    if v or hz:
        return f" on the {v or hz}"
    return " in the middle"


def captions_for(mode: str, changed_px: int, objects: int, label: np.ndarray, removed: int = 0) -> list[str]:
    """Five reference sentences for a synthesised pair, in LEVIR-CC's words. ``objects``: buildings that appear
    (that vanish for ``mode`` "removed"); ``removed``: STAR pairs' buildings of the before date only."""
    if changed_px == 0:
        return list(NO_CHANGE_CAPTIONS)
    where = _where(label)
    if mode == "star":  # both kinds: say the one that dominates, or both
        if removed > 2 * objects:
            mode, objects = "removed", removed
        elif objects > 2 * removed:
            mode = "new"
        else:
            return [f"some buildings are built and some houses are removed{where}",
                    "some houses are removed and some buildings are built",
                    f"some houses are built and some buildings are removed{where}",
                    "some buildings are removed and some houses are built",
                    f"some buildings are built and some houses are removed{where}"]
    many = objects >= 6
    if mode == "removed":
        subj = "many houses are" if many else ("a house is" if objects == 1 else "some houses are")
        return [f"{subj} removed{where}", f"{subj} removed{where}",
                f"{'many buildings' if many else 'some buildings' if objects > 1 else 'a building'} "
                f"{'disappear' if objects > 1 else 'disappears'}{where}",
                f"{subj} removed", f"{subj} removed{where}"]
    subj = "many houses are" if many else ("a house is" if objects == 1 else "some houses are")
    bsubj = "many buildings are" if many else ("a building is" if objects == 1 else "some buildings are")
    return [f"{subj} built{where}", f"{bsubj} built{where}", f"{subj} constructed{where}", f"{subj} built",
            f"{bsubj} constructed{where}"]


class RandomCrops(Dataset):
    """Real labelled pairs (a LEVIR-CD-layout dataset) as ``repeats`` random ``size``² crops each, flipped and
    rotated alike in both dates and the mask, captioned from the mask (its objects are new buildings)."""

    def __init__(self, pairs: Dataset, size: int, repeats: int, seed: int = 0) -> None:
        self.pairs, self.size, self.repeats, self.seed = pairs, size, repeats, seed

    def __len__(self) -> int:
        return len(self.pairs) * self.repeats

    def __getitem__(self, i: int) -> dict:
        item = self.pairs[i % len(self.pairs)]
        rng = np.random.default_rng([self.seed, 7, i])
        h, w = item["mask"].shape
        s = min(self.size, h, w)
        y, x = int(rng.integers(0, h - s + 1)), int(rng.integers(0, w - s + 1))
        k, flip = int(rng.integers(4)), bool(rng.integers(2))

        def view(t: torch.Tensor) -> torch.Tensor:
            t = torch.rot90(t[..., y:y + s, x:x + s], k, (-2, -1))
            return (t.flip(-1) if flip else t).contiguous()

        before, after, mask = view(item["before"]), view(item["after"]), view(item["mask"])
        if rng.random() < 0.5:  # another look of one date (sensor, light, season)
            after = torch.from_numpy(np.ascontiguousarray(
                nuisance(after.numpy().transpose(1, 2, 0), rng, 0.5).transpose(2, 0, 1)))
        label = mask.numpy().astype(bool)
        objects = int(ndimage.label(label)[1])
        return {"before": before, "after": after, "mask": mask,
                "captions": captions_for("new", int(label.sum()), objects, label), "name": f"{item['name']}_crop{i}"}
