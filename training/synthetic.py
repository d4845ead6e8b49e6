"""Synthetic bi-temporal aerial scenes with a known change mask and LEVIR-CC-style captions.

Training and test data, not shipped in the plugin (``training/`` is left out of its zip). Why: tests need pairs whose true change is known exactly, benchmarks need arbitrarily large rasters,
and small change-detection / captioning models need cheap training data. A :class:`Scene` is a list of
vector objects in pixel space (roads, buildings, trees, water, ground patches), each present *before*,
*after* or both. Every pixel is a deterministic function of its global coordinates and the seed
(hashed-lattice value noise, analytic shapes), so a window renders identically whether a raster is
produced at once or block by block; :func:`write_pair` therefore streams 10,000 x 10,000 pairs in flat
memory. Nuisance differences (illumination, gamma, vegetation hue, sub-pixel misregistration, sensor
noise, shadow length) change the *after* look without touching the mask.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from changescribe.core.annotations import NO_CHANGE_CAPTIONS

# -- deterministic noise: value noise on a hashed integer lattice, evaluated on separable grids ----------

_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_K1, _K2 = np.uint64(0x9E3779B97F4A7C15), np.uint64(0xC2B2AE3D27D4EB4F)


def _hash2(iy: np.ndarray, ix: np.ndarray, salt: int) -> np.ndarray:
    """Lattice values in [-1, 1) from integer coordinates (splitmix-style mixing; wraps on purpose)."""
    h = (iy.astype(np.uint64) * _K1) ^ (ix.astype(np.uint64) * _K2) ^ np.uint64(salt & 0xFFFFFFFFFFFFFFFF)
    for shift, mul in ((30, _M1), (27, _M2)):
        h ^= h >> np.uint64(shift)
        h *= mul
    h ^= h >> np.uint64(31)
    return (h >> np.uint64(40)).astype(np.float32) * np.float32(2.0 / 2**24) - np.float32(1.0)


def _noise(ys: np.ndarray, xs: np.ndarray, scale: float, salt: int) -> np.ndarray:
    """Smooth value noise (h, w) in [-1, 1] at global coordinates ys (h,), xs (w,); scale in pixels."""
    fy, fx = ys / scale, xs / scale
    iy, ix = np.floor(fy).astype(np.int64), np.floor(fx).astype(np.int64)
    ty, tx = (fy - iy).astype(np.float32), (fx - ix).astype(np.float32)
    ty, tx = ty * ty * (3 - 2 * ty), tx * tx * (3 - 2 * tx)
    y0, x0 = iy.min(), ix.min()
    lat = _hash2(np.arange(y0, iy.max() + 2)[:, None], np.arange(x0, ix.max() + 2)[None, :], salt)
    rx, ry = ix - x0, iy - y0
    a = lat[:, rx] * (1 - tx) + lat[:, rx + 1] * tx
    return a[ry] * (1 - ty)[:, None] + a[ry + 1] * ty[:, None]


def _fbm(ys: np.ndarray, xs: np.ndarray, scale: float, salt: int, octaves: int = 3) -> np.ndarray:
    """Fractal sum of value-noise octaves, roughly in [-1, 1]."""
    out = sum(_noise(ys, xs, scale / 2**o, salt * 31 + o) * np.float32(0.5**o) for o in range(octaves))
    return out / np.float32(2 - 0.5 ** (octaves - 1))


def _smooth(e0: float, e1: float, x):
    t = np.clip((x - e0) / (e1 - e0), 0.0, 1.0)
    return t * t * (3 - 2 * t)


# -- materials, looks, scene ---------------------------------------------------------------------------

# Display reflectance 0..1 per band: R, G, B, NIR, SWIR (extra bands beyond these are mixes of NIR/SWIR).
_MAT = {k: np.array(v, np.float32) for k, v in {
    "grass": (0.31, 0.39, 0.21, 0.60, 0.27), "dry": (0.55, 0.53, 0.40, 0.42, 0.45),
    "soil": (0.72, 0.66, 0.54, 0.38, 0.58), "concrete": (0.64, 0.64, 0.62, 0.40, 0.45),
    "pave": (0.60, 0.60, 0.58, 0.36, 0.42), "asphalt": (0.30, 0.31, 0.32, 0.21, 0.24),
    "walk": (0.70, 0.69, 0.66, 0.46, 0.50), "paint": (0.93, 0.93, 0.88, 0.82, 0.78),
    "shallow": (0.24, 0.36, 0.34, 0.10, 0.05), "deep": (0.08, 0.16, 0.19, 0.03, 0.02),
    "tree": (0.15, 0.23, 0.11, 0.66, 0.21), "rubble": (0.62, 0.57, 0.50, 0.38, 0.48),
    "shadow": (0.38, 0.42, 0.52, 0.34, 0.33)}.items()}  # shadow: multiplicative tint at full shadow
_ROOFS = np.array([(0.74, 0.73, 0.71, 0.50, 0.55), (0.44, 0.44, 0.46, 0.30, 0.34), (0.63, 0.35, 0.27, 0.42, 0.45),
                   (0.50, 0.40, 0.33, 0.38, 0.42), (0.88, 0.88, 0.86, 0.62, 0.66), (0.40, 0.47, 0.56, 0.33, 0.36),
                   (0.30, 0.30, 0.32, 0.22, 0.26)], np.float32)
_ROOF_P = np.array([0.2, 0.2, 0.2, 0.12, 0.1, 0.08, 0.1])
_VEG_TINT = np.array([0.30, 0.10, -0.10, -0.30, 0.15], np.float32)  # direction "drier / yellower"


@dataclass
class Look:
    """How one date is imaged: all of this changes pixels but is *not* change (the mask stays 0)."""

    gain: np.ndarray  # (5,) per-band illumination / colour balance
    offset: float  # additive haze
    gamma: float
    veg_tint: np.ndarray  # (5,) multiplier on grass and tree colours (season)
    shift: tuple[float, float]  # (dy, dx) misregistration in pixels
    noise: float  # sensor noise sigma (reflectance units)
    noise_seed: int  # noise realisation; the after date reuses the before one when nuisance is 0
    shadow_len: float  # shadow length per unit object height
    sun: float  # azimuth towards the sun (radians; image axes x right, y down)


@dataclass
class _Obj:
    kind: str  # "road" (one segment) | "building" | "tree" | "water" | "patch" (ground cover, never change)
    g: dict  # geometry in pixel space (x = col, y = row) and appearance
    bbox: tuple[float, float, float, float]  # r0, c0, r1, c1 including shadow and margin
    present: tuple[bool, bool]  # (before, after)
    event: int = -1


@dataclass
class Scene:
    """A bi-temporal layout; render any window of it with :func:`render` / :func:`render_mask`."""

    height: int
    width: int
    seed: int
    gsd: float
    theta: float  # orientation of the road grid (radians)
    objects: list[_Obj]
    looks: dict[str, Look]
    events: list[dict] = field(default_factory=list)
    changes: list[dict] = field(default_factory=list)
    captions: list[str] = field(default_factory=list)
    cell: int = 256
    _index: dict = field(default_factory=dict, repr=False)

    def build_index(self) -> None:
        """Bucket objects by grid cell so a window only visits objects that can touch it."""
        self._index = {}
        for i, o in enumerate(self.objects):
            r0, c0, r1, c1 = (int(math.floor(v / self.cell)) for v in o.bbox)
            for key in ((a, b) for a in range(r0, r1 + 1) for b in range(c0, c1 + 1)):
                self._index.setdefault(key, []).append(i)

    def query(self, r0: int, c0: int, r1: int, c1: int) -> list[int]:
        """Indices (= draw order) of objects whose bbox meets rows r0..r1, cols c0..c1."""
        ids: set[int] = set()
        for a in range(r0 // self.cell, (r1 - 1) // self.cell + 1):
            for b in range(c0 // self.cell, (c1 - 1) // self.cell + 1):
                ids.update(self._index.get((a, b), ()))
        bb = [(i, self.objects[i].bbox) for i in sorted(ids)]
        return [i for i, b in bb if b[0] < r1 and b[2] > r0 and b[1] < c1 and b[3] > c0]


# -- geometry: signed distances (negative inside) on broadcast grids Y (h, 1), X (1, w) ----------------

def _sd_rect(g: dict, part, Y, X):
    du, dv, a, b = part
    dx, dy = X - g["cx"], Y - g["cy"]
    u = dx * g["cos"] + dy * g["sin"] - du
    v = -dx * g["sin"] + dy * g["cos"] - dv
    return np.maximum(np.abs(u) - a, np.abs(v) - b), u, v


def _corners(g: dict, part) -> np.ndarray:
    du, dv, a, b = part
    return np.array([(g["cx"] + (du + pu) * g["cos"] - (dv + pv) * g["sin"],
                      g["cy"] + (du + pu) * g["sin"] + (dv + pv) * g["cos"])
                     for pu, pv in ((-a, -b), (a, -b), (a, b), (-a, b))])


def _seg(Y, X, x0, y0, x1, y1):
    """Distance to a segment and the clamped position t along it."""
    ex, ey = x1 - x0, y1 - y0
    t = np.clip(((X - x0) * ex + (Y - y0) * ey) / max(ex * ex + ey * ey, 1e-9), 0.0, 1.0)
    return np.hypot(X - x0 - t * ex, Y - y0 - t * ey), t


def _sd_blob(g: dict, ys, xs):
    """Ellipse with a noisy shore (ponds, soil patches); the wobble is global noise, so it tiles."""
    dx, dy = xs[None, :] - g["cx"], ys[:, None] - g["cy"]
    u = (dx * g["cos"] + dy * g["sin"]) / g["ra"]
    v = (-dx * g["sin"] + dy * g["cos"]) / g["rb"]
    return (np.sqrt(u * u + v * v) - 1) * min(g["ra"], g["rb"]) + g["wob"] * _fbm(ys, xs, g["wscale"], g["salt"], 2)


def _sd(o: _Obj, ys, xs):
    """Footprint signed distance of an object (occupancy tests and the change mask)."""
    Y, X, g = ys[:, None], xs[None, :], o.g
    if "parts" in g:
        return np.minimum.reduce([_sd_rect(g, p, Y, X)[0] for p in g["parts"]])
    if o.kind == "tree":
        return np.hypot(X - g["cx"], Y - g["cy"]) - g["r"]
    if "p0" in g:  # road or river segment
        return _seg(Y, X, *g["p0"], *g["p1"])[0] - g["hw"] - g.get("walk", 0.0)
    return _sd_blob(g, ys, xs)


def _hull_sd(pts: np.ndarray, Y, X):
    """Signed distance (exact inside, approximate outside) to the convex hull of pts (k, 2) = (x, y)."""
    pts = pts[np.lexsort((pts[:, 1], pts[:, 0]))]

    def half(seq):
        h: list = []
        for p in seq:
            while len(h) >= 2 and ((h[-1][0] - h[-2][0]) * (p[1] - h[-2][1])
                                   <= (h[-1][1] - h[-2][1]) * (p[0] - h[-2][0])):
                h.pop()
            h.append(p)
        return h[:-1]
    hull = np.array(half(pts) + half(pts[::-1]))
    cx, cy = hull.mean(0)
    sd = None
    for (x0, y0), (x1, y1) in zip(hull, np.roll(hull, -1, 0)):
        ln = math.hypot(x1 - x0, y1 - y0)
        if ln > 1e-9:
            nx, ny = (y1 - y0) / ln, -(x1 - x0) / ln
            if nx * (cx - x0) + ny * (cy - y0) > 0:
                nx, ny = -nx, -ny
            d = (X - x0) * nx + (Y - y0) * ny
            sd = d if sd is None else np.maximum(sd, d)
    return sd


# -- layout ----------------------------------------------------------------------------------------------

class _Layout:
    """Builds the object list in the order roads, change events, water, buildings, trees, so later objects
    avoid earlier ones through a coarse occupancy grid. Sizes are in metres times m (pixels per metre)."""

    CS, FS = 4.0, 16.0  # occupancy cell; layout field / event map step (pixels)

    def __init__(self, h: int, w: int, seed: int, gsd: float, change_level: float):
        self.h, self.w, self.seed, self.m, self.change_level = h, w, seed, 1.0 / gsd, change_level
        self.rng = np.random.default_rng([seed, 7])
        self.pad = 12 * self.m  # objects may straddle the image edge by this much
        shape = (int((h + 2 * self.pad) / self.CS) + 2, int((w + 2 * self.pad) / self.CS) + 2)
        self.occ = np.zeros(shape, np.int32)  # 0 free, 1 static, 2 + e: new object of event e
        self.tocc = np.zeros(shape, bool)  # tree canopies (planted trees avoid old ones)
        self.objects: list[_Obj] = []
        self.roads: list[dict] = []
        self.events: list[dict] = []
        self.fields: dict[str, np.ndarray] = {}
        self.yard: list = []
        self.theta = self.rng.normal(0, 0.06) if self.rng.random() < 0.6 else self.rng.uniform(0, math.pi / 2)

    # occupancy and coarse fields
    def _cells(self, o: _Obj, margin: float, grid: np.ndarray):
        i0, j0, i1, j1 = (int((v + s * margin + self.pad) / self.CS) + (s > 0) for v, s in zip(o.bbox, (-1, -1, 1, 1)))
        i0, j0, i1, j1 = max(i0, 0), max(j0, 0), min(i1, grid.shape[0]), min(j1, grid.shape[1])
        if i0 >= i1 or j0 >= j1:
            return np.zeros((0, 0)), np.zeros((0, 0), bool)
        ys = (np.arange(i0, i1) + 0.5) * self.CS - self.pad
        xs = (np.arange(j0, j1) + 0.5) * self.CS - self.pad
        return grid[i0:i1, j0:j1], _sd(o, ys, xs) <= margin + 0.5 * self.CS

    def hits(self, o: _Obj, margin: float = 0.0, grid=None) -> np.ndarray:
        sub, inside = self._cells(o, margin, self.occ if grid is None else grid)
        return sub[inside]

    def mark(self, o: _Obj, value, margin: float = 0.0, grid=None) -> None:
        sub, inside = self._cells(o, margin, self.occ if grid is None else grid)
        sub[inside] = value

    def inside(self, y: float, x: float, slack: float = 0.0) -> bool:
        p = self.pad - slack
        return -p <= y <= self.h + p and -p <= x <= self.w + p

    def add(self, o: _Obj) -> _Obj:
        self.objects.append(o)
        return o

    def _ij(self, shape, y: float, x: float) -> tuple[int, int]:
        return (min(max(int(round((y + self.pad) / self.FS)), 0), shape[0] - 1),
                min(max(int(round((x + self.pad) / self.FS)), 0), shape[1] - 1))

    def _grid(self):
        return (np.arange(-self.pad, self.h + self.pad + self.FS, self.FS),
                np.arange(-self.pad, self.w + self.pad + self.FS, self.FS))

    def field(self, name: str, y: float, x: float) -> float:
        """Low-frequency layout fields (urban density, vegetation, bare soil) sampled on a coarse grid."""
        if name not in self.fields:
            (ys, xs), m, k = self._grid(), self.m, self.seed * 7
            self.fields[name] = {"urban": lambda: _smooth(-0.3, 0.15, _fbm(ys, xs, 180 * m, k + 101, 2)),
                                 "veg": lambda: _smooth(-0.1, 0.35, _fbm(ys, xs, 120 * m, k + 202, 2)),
                                 "soil": lambda: _ground_w(self.seed, ys, xs, m)[0]}[name]()
        f = self.fields[name]
        return float(f[self._ij(f.shape, y, x)])

    def map_events(self) -> None:
        """Rasterise event regions (first event wins) so lots look up their region in O(1)."""
        ys, xs = self._grid()
        self.evmap = np.full((len(ys), len(xs)), -1, np.int32)
        for ev in self.events:
            y, x, r = ev["y"], ev["x"], ev["r"]
            (i0, j0), (i1, j1) = (self._ij(self.evmap.shape, y + s * r, x + s * r) for s in (-1, 1))
            sub = self.evmap[i0:i1 + 1, j0:j1 + 1]
            sub[(np.hypot(ys[i0:i1 + 1, None] - y, xs[None, j0:j1 + 1] - x) < r) & (sub < 0)] = ev["id"]

    def region(self, y: float, x: float, kind: str) -> dict | None:
        e = self.evmap[self._ij(self.evmap.shape, y, x)]
        return self.events[e] if e >= 0 and self.events[e]["type"] == kind else None

    # roads
    def road(self, pts: list, event: int = -1, houses: bool = True) -> None:
        m, rng = self.m, self.rng
        if len(pts) < 2:
            return
        concrete = rng.random() < 0.5  # suburban concrete streets vs asphalt roads
        rd = dict(id=len(self.roads), pts=np.array(pts, float), hw=rng.uniform(3.0, 4.5 if concrete else 6.0) * m,
                  walk=rng.uniform(1.2, 2.2) * m if rng.random() < 0.45 else 0.0, event=event, houses=houses)
        tone = rng.uniform(0.88, 1.1) * ((1.08 if concrete else 0.8) if event >= 0 else 1.0)  # fresh surfaces
        paint = not concrete and rng.random() < 0.7
        s = 0.0
        for (x0, y0), (x1, y1) in zip(rd["pts"][:-1], rd["pts"][1:]):
            e = rd["hw"] + rd["walk"] + 3
            g = dict(p0=(x0, y0), p1=(x1, y1), s0=s, hw=rd["hw"], walk=rd["walk"], paint=paint, tone=tone,
                     road=rd["id"], mat="concrete" if concrete else "asphalt")
            o = self.add(_Obj("road", g, (min(y0, y1) - e, min(x0, x1) - e, max(y0, y1) + e, max(x0, x1) + e),
                              (event < 0, True), event))
            self.mark(o, 1 if event < 0 else 2 + event, 0.5 * m)
            s += math.hypot(x1 - x0, y1 - y0)
        self.roads.append(rd)

    def polyline(self, x: float, y: float, ang: float, length: float, bend: float) -> list:
        """A gently bending polyline from (x, y) along ang, kept to the part near the image."""
        step, pts, turn, prev = 12 * self.m, [], 0.0, (x, y)
        for _ in range(max(int(length / step), 1)):
            turn = 0.85 * turn + self.rng.normal(0, bend)
            ang += turn
            x, y = x + step * math.cos(ang), y + step * math.sin(ang)
            inside = self.inside(y, x, -40 * self.m)
            if inside and not pts:
                pts.append(prev)
            if pts:
                pts.append((x, y))
                if not inside:
                    break
            prev = (x, y)
        return pts

    def static_roads(self) -> None:
        """Two families of roads along the scene's grid angle, some bent, some dead ends."""
        m, rng = self.m, self.rng
        diag = math.hypot(self.h, self.w) + 2 * self.pad
        for k in range(2):
            ang = self.theta + k * math.pi / 2
            off = -diag / 2 - rng.uniform(0, 150 * m)
            while off < diag / 2:
                off += rng.uniform(70, 260) * m
                if rng.random() < 0.3:
                    continue
                start = -diag / 2 if rng.random() < 0.75 else rng.uniform(-diag / 2, diag / 4)
                length = diag if start == -diag / 2 else rng.uniform(60, 400) * m
                sx, sy = self.w / 2 - math.sin(ang) * off, self.h / 2 + math.cos(ang) * off
                self.road(self.polyline(sx + start * math.cos(ang), sy + start * math.sin(ang), ang, length,
                                        0.0 if rng.random() < 0.6 else rng.uniform(0.005, 0.02)))

    def event_road(self, ev: dict) -> None:
        """A new branch street off the nearest old road towards the anchor, or a new through road."""
        m, rng, best = self.m, self.rng, None
        for rd in (r for r in self.roads if r["event"] < 0):
            d = np.hypot(rd["pts"][:, 0] - ev["x"], rd["pts"][:, 1] - ev["y"])
            i = min(int(d.argmin()), len(d) - 2)
            if d[i] < 120 * m and (best is None or d[i] < best[0]):
                best = (d[i], rd, i)
        houses = rng.random() < 0.6
        if best is None:
            ang = self.theta + rng.choice([0, math.pi / 2]) + rng.normal(0, 0.1)
            L = math.hypot(self.h, self.w) + 2 * self.pad
            self.road(self.polyline(ev["x"] - L / 2 * math.cos(ang), ev["y"] - L / 2 * math.sin(ang), ang, L,
                                    rng.uniform(0, 0.015)), ev["id"], houses)
            return
        _, rd, i = best
        (x0, y0), (x1, y1) = rd["pts"][i], rd["pts"][i + 1]
        ang = math.atan2(y1 - y0, x1 - x0)
        side = 1 if (ev["x"] - x0) * -math.sin(ang) + (ev["y"] - y0) * math.cos(ang) >= 0 else -1
        bang = ang + side * math.pi / 2 + rng.normal(0, 0.05)
        length = math.hypot(ev["x"] - x0, ev["y"] - y0) + rng.uniform(30, 150) * m
        x0, y0 = x0 + math.cos(bang) * rd["hw"], y0 + math.sin(bang) * rd["hw"]  # its cap stays on the old road
        self.road(self.polyline(x0, y0, bang, length, rng.uniform(0, 0.02)), ev["id"], houses)

    # buildings
    def building(self, cx, cy, ang, a, b, present, event=-1, big=False, road=None, side=0, rside=None):
        """A house (hip / gable roof, maybe L-shaped) or a large flat-roofed building, if the spot is free."""
        m, rng = self.m, self.rng
        parts = [(0.0, 0.0, a, b)]
        if rng.random() < (0.15 if big else 0.5):
            a2, b2 = a * rng.uniform(0.35, 0.6), b * rng.uniform(0.5, 0.9)
            parts.append((rng.choice([-1, 1]) * (a - a2), rng.choice([-1, 1]) * (b + b2 * 0.9), a2, b2))
        height = (rng.uniform(6, 14) if big else rng.uniform(3.5, 7)) * m
        g = dict(cx=cx, cy=cy, cos=math.cos(ang), sin=math.sin(ang), parts=parts, height=height, big=big,
                 roof="flat" if big or rng.random() < 0.12 else ("hip" if rng.random() < 0.5 else "gable"),
                 col=int(rng.choice([0, 1, 4, 5]) if big else rng.choice(len(_ROOFS), p=_ROOF_P)),
                 tone=rng.uniform(0.9, 1.08), road=road, side=side, rside=rside)
        e = max(abs(du) + a_ + abs(dv) + b_ for du, dv, a_, b_ in parts) + height * 2.4 + 4  # 2.4: longest shadow
        o = _Obj("building", g, (cy - e, cx - e, cy + e, cx + e), present, event)
        if not self.inside(cy, cx) or self.hits(o, 1.0 * m).any():
            return None
        self.mark(o, 1 if present[0] else 2 + event)
        if present == (True, False):  # demolished: rubble where it stood
            self.add(_Obj("patch", dict(g, mat="rubble"), o.bbox, (False, True), event))
        return self.add(o)

    def decide(self, y: float, x: float, rd: dict):
        """A lot's house: new along new roads and in build regions, demolished in demolition regions,
        otherwise static with the urban-density probability; (None, -1) for an empty lot."""
        rng = self.rng
        if rd["event"] >= 0:
            return ((False, True), rd["event"]) if rd["houses"] and rng.random() < 0.8 else (None, -1)
        if (ev := self.region(y, x, "build")) is not None:
            return ((False, True), ev["id"]) if rng.random() < 0.85 else (None, -1)
        if (ev := self.region(y, x, "demolish")) is not None and rng.random() < 0.9:
            return ((True, False), ev["id"]) if rng.random() < 0.8 else ((True, True), -1)
        return ((True, True), -1) if rng.random() < self.field("urban", y, x) else (None, -1)

    def lots(self, rd: dict) -> None:
        """March along a road placing houses on both sides, with driveways and yard trees."""
        m, rng, pts = self.m, self.rng, rd["pts"]
        seg = np.diff(pts, axis=0)
        cum = np.concatenate([[0], np.cumsum(np.hypot(seg[:, 0], seg[:, 1]))])
        lot = rng.uniform(15, 24) * m
        for s in np.arange(rng.uniform(0, lot), cum[-1], lot):
            i = min(int(np.searchsorted(cum, s, "right")) - 1, len(seg) - 1)
            px, py = pts[i] + (s - cum[i]) / max(cum[i + 1] - cum[i], 1e-9) * seg[i]
            ang = math.atan2(seg[i, 1], seg[i, 0])
            ca, sa = math.cos(ang), math.sin(ang)
            for side in (-1, 1):
                a, b = rng.uniform(0.28, 0.42) * lot, rng.uniform(4, 7.5) * m
                off = rd["hw"] + rd["walk"] + rng.uniform(3, 8) * m + b
                cx, cy = px - side * sa * off, py + side * ca * off
                present, ev = self.decide(cy, cx, rd)
                if present is None:
                    continue
                dx, dy = cx - px, cy - py
                rside = ("left" if dx < 0 else "right") if abs(dx) > abs(dy) else ("above" if dy < 0 else "below")
                o = self.building(cx, cy, ang, a, b, present, ev, road=rd["id"], side=side, rside=rside)
                if o is None:
                    continue
                if rng.random() < 0.8:  # driveway (stays when the house is demolished; never part of the mask)
                    edge, front = rd["hw"] + rd["walk"] * 0.5, off - b
                    mo, du = (edge + front) / 2 + 0.3 * m, rng.uniform(-0.5, 0.5) * a
                    part = (0.0, 0.0, rng.uniform(1.4, 2.6) * m, (front - edge) / 2 + 0.3 * m)
                    g = dict(cx=px - side * sa * mo + du * ca, cy=py + side * ca * mo + du * sa, cos=ca, sin=sa,
                             parts=[part], mat="concrete")
                    self.add(_Obj("patch", g, o.bbox, (present != (False, True), True), o.event))
                if present == (True, True) and rng.random() < 0.35:
                    back, along = b + rng.uniform(2, 6) * m, rng.normal(0, a / 2)
                    self.yard.append((cx - side * sa * back + along * ca, cy + side * ca * back + along * sa))

    def block(self, ev: dict, present) -> None:
        """Houses in neat rows around an anchor away from roads, or one large building."""
        m, rng = self.m, self.rng
        ang = self.theta + rng.choice([0, math.pi / 2])
        if rng.random() < 0.25:
            self.building(ev["x"], ev["y"], ang, rng.uniform(10, 28) * m, rng.uniform(8, 18) * m, present,
                          ev["id"], big=True)
            return
        a, b, gap = rng.uniform(4.5, 8) * m, rng.uniform(4, 6.5) * m, rng.uniform(4, 9) * m
        rows, cols = int(rng.integers(1, 3)), int(rng.integers(2, 6))
        for i in range(rows):
            for j in range(cols):
                u, v = (j - (cols - 1) / 2) * (2 * a + gap), (i - (rows - 1) / 2) * (2 * b + 2 * gap)
                self.building(ev["x"] + u * math.cos(ang) - v * math.sin(ang),
                              ev["y"] + u * math.sin(ang) + v * math.cos(ang), ang, a, b, present, ev["id"])

    # trees, water, ground patches
    def tree(self, x: float, y: float, r: float, present, event: int = -1) -> None:
        if not self.inside(y, x):
            return
        e = r * 2.4 + 4
        o = _Obj("tree", dict(cx=x, cy=y, r=r, tone=self.rng.uniform(0.8, 1.2)), (y - e, x - e, y + e, x + e),
                 present, event)
        hit = self.hits(o)
        if present == (False, True):
            if hit.any() or self.hits(o, 0.0, self.tocc).any():
                return
        elif (hit == 1).any():
            return
        elif (hit >= 2).any():  # stands where something new is built: cleared
            o.present, o.event = (True, False), int(hit[hit >= 2][0]) - 2
        self.mark(o, True, 0.0, self.tocc)
        self.add(o)

    def cluster(self, x: float, y: float, n: int, spread: float, present, event=-1, rmax=4.5) -> None:
        for _ in range(n):
            self.tree(x + self.rng.normal(0, spread), y + self.rng.normal(0, spread),
                      self.rng.uniform(1.8, rmax) * self.m, present, event)

    def blob(self, kind: str, x, y, ra, rb, present, event=-1, mat=None) -> None:
        ang = self.rng.uniform(0, math.pi)
        g = dict(cx=x, cy=y, ra=ra, rb=rb, cos=math.cos(ang), sin=math.sin(ang), salt=int(self.rng.integers(1 << 40)),
                 mat=mat, wob=0.22 * min(ra, rb), wscale=max(min(ra, rb) * 0.7, 3.0))
        e = max(ra, rb) * 1.3 + 4
        o = _Obj(kind, g, (y - e, x - e, y + e, x + e), present, event)
        if kind == "water":
            if self.hits(o, 2 * self.m).any():
                return
            self.mark(o, 1 if present[0] else 2 + event, self.m)
        self.add(o)

    def build(self) -> list[_Obj]:
        m, rng, h, w = self.m, self.rng, self.h, self.w
        area = (h + 2 * self.pad) * (w + 2 * self.pad) / (m * m)  # square metres
        self.static_roads()
        n_ev = max(1, int(rng.poisson(self.change_level * 1.6 * h * w / 256**2))) if self.change_level > 0 else 0
        for e in range(n_ev):
            ev = dict(id=e, y=rng.uniform(0.1, 0.9) * h, x=rng.uniform(0.1, 0.9) * w, r=rng.uniform(25, 60) * m,
                      type=str(rng.choice(["build", "demolish", "road", "cut", "plant", "water"],
                                          p=[0.42, 0.12, 0.16, 0.14, 0.11, 0.05])))
            self.events.append(ev)
            if ev["type"] == "road":
                self.event_road(ev)
            elif ev["type"] == "water":
                ra, present = rng.uniform(8, 25) * m, [(False, True), (True, False)][rng.integers(2)]
                self.blob("water", ev["x"], ev["y"], ra, ra * rng.uniform(0.5, 1), present, e)
            elif ev["type"] == "build" and rng.random() < 0.6:  # construction on bare land
                rb = ev["r"] * rng.uniform(0.6, 1)
                self.blob("patch", ev["x"], ev["y"], ev["r"] * 1.2, rb, (True, True), mat="soil")
        if rng.random() < 0.05:  # a river
            ang, L = self.theta + rng.normal(0, 0.4) + rng.choice([0, math.pi / 2]), math.hypot(h, w) + 2 * self.pad
            x, y = rng.uniform(0, w) - L / 2 * math.cos(ang), rng.uniform(0, h) - L / 2 * math.sin(ang)
            hw = rng.uniform(6, 15) * m
            pts = self.polyline(x, y, ang, L * 1.2, 0.03)
            for (x0, y0), (x1, y1) in zip(pts[:-1], pts[1:]):
                bbox = (min(y0, y1) - hw - 4, min(x0, x1) - hw - 4, max(y0, y1) + hw + 4, max(x0, x1) + hw + 4)
                self.mark(self.add(_Obj("water", dict(p0=(x0, y0), p1=(x1, y1), hw=hw), bbox, (True, True))), 1, 2 * m)
        for kind, n, r0, r1, mat in (("water", area / 150000, 8, 40, None), ("patch", area / 25000, 15, 60, "soil")):
            for _ in range(int(rng.poisson(n))):
                ra, x, y = rng.uniform(r0, r1) * m, rng.uniform(0, w), rng.uniform(0, h)
                self.blob(kind, x, y, ra, ra * rng.uniform(0.4, 1), (True, True), mat=mat)
        self.map_events()
        for rd in list(self.roads):
            self.lots(rd)
        for ev in self.events:
            if ev["type"] in ("build", "demolish") and not any(  # no road near: a block on open land
                    np.hypot(r["pts"][:, 0] - ev["x"], r["pts"][:, 1] - ev["y"]).min() < ev["r"] for r in self.roads):
                self.block(ev, (False, True) if ev["type"] == "build" else (True, False))
        for _ in range(int(rng.poisson(area / 30000))):  # large flat-roofed buildings
            x, y = rng.uniform(0, w), rng.uniform(0, h)
            if rng.random() < self.field("urban", y, x):
                self.building(x, y, self.theta + rng.normal(0, 0.02), rng.uniform(10, 30) * m, rng.uniform(8, 20) * m,
                              (True, True), big=True)
        for ev in self.events:  # trees to be cut, or cleared by construction, or planted
            if ev["type"] == "cut" or ev["type"] in ("build", "road") and rng.random() < 0.4:
                for _ in range(int(rng.integers(1, 4))):
                    self.cluster(ev["x"] + rng.normal(0, ev["r"] / 2), ev["y"] + rng.normal(0, ev["r"] / 2),
                                 int(rng.integers(6, 25)), rng.uniform(5, 14) * m,
                                 (True, False) if ev["type"] == "cut" else (True, True), ev["id"])
            elif ev["type"] == "plant":
                for _ in range(int(rng.integers(1, 3))):
                    self.cluster(ev["x"] + rng.normal(0, ev["r"] / 3), ev["y"] + rng.normal(0, ev["r"] / 3),
                                 int(rng.integers(5, 16)), rng.uniform(4, 10) * m, (False, True), ev["id"], rmax=3.2)
        for _ in range(int(rng.poisson(area / 1200))):
            x, y = rng.uniform(-self.pad, w + self.pad), rng.uniform(-self.pad, h + self.pad)
            veg = self.field("veg", y, x)
            if rng.random() < 0.15 + 0.85 * veg:
                self.cluster(x, y, 1 + int(rng.poisson(1 + 8 * veg)), rng.uniform(3, 12) * m, (True, True))
        for x, y in self.yard:
            self.tree(x, y, rng.uniform(2.0, 4.0) * m, (True, True))
        return self.objects


def _looks(seed: int, s: float) -> dict[str, Look]:
    """Per-date looks; the after date departs from the before date by nuisance strength s."""
    rng = np.random.default_rng([seed, 11])
    base = (1 + rng.normal(0, 0.03, 5)).astype(np.float32)
    before = Look(base, float(rng.normal(0, 0.01)), float(math.exp(rng.normal(0, 0.05))), np.ones(5, np.float32),
                  (0.0, 0.0), 0.005, 0, float(rng.uniform(0.6, 1.1)), float(rng.uniform(0, 2 * math.pi)))
    gain = base * (1 + s * rng.normal(0, 0.12)) * (1 + s * rng.normal(0, 0.05, 5))
    return {"before": before, "after": Look(
        gain.astype(np.float32), before.offset + s * float(rng.normal(0, 0.03)),
        before.gamma * float(math.exp(s * rng.normal(0, 0.2))),
        (1 + _VEG_TINT * s * float(rng.uniform(-1, 1))).astype(np.float32),
        (s * float(rng.uniform(-1, 1)), s * float(rng.uniform(-1, 1))), 0.005 + 0.008 * s, int(s > 0),
        before.shadow_len * (1 + s * float(rng.uniform(-0.4, 0.4))), before.sun + s * float(rng.normal(0, 0.15)))}


def make_scene(height: int, width: int, seed: int = 0, change_level: float = 0.5, nuisance: float = 0.5,
               gsd: float = 0.5) -> Scene:
    """Lay out a bi-temporal scene (objects, change records, captions); pixels come later from render().

    change_level 0 gives no change at all, higher values more change events per area (at least one visible
    change is guaranteed when > 0); nuisance (0..1) scales the look difference between the dates; gsd
    (m/pixel) scales object sizes.
    """
    lay = _Layout(height, width, seed, gsd, change_level)
    scene = Scene(height, width, seed, gsd, lay.theta, lay.build(), _looks(seed, nuisance), lay.events)
    scene.changes = _changes(scene, lay)
    for k in range(50):  # guarantee a visible change: new buildings (a block) on open land
        if change_level <= 0 or scene.changes:
            break
        ev = dict(id=len(lay.events), type="build", y=lay.rng.uniform(0.2, 0.8) * height,
                  x=lay.rng.uniform(0.2, 0.8) * width, r=30 * lay.m)
        lay.events.append(ev)
        lay.block(ev, (False, True))
        scene.changes = _changes(scene, lay)
    scene.build_index()
    scene.captions = _captions(scene)
    return scene


def _changes(scene: Scene, lay: _Layout) -> list[dict]:
    """One record per changed building / road / tree group (per event) / pond, clipped to the image."""
    from shapely import affinity
    from shapely.geometry import LineString, Point, Polygon, box
    from shapely.ops import unary_union

    groups: dict = {}
    for o in scene.objects:
        if o.kind == "patch" or o.present[0] == o.present[1]:
            continue
        g = o.g
        if o.kind == "building":
            geom, key = unary_union([Polygon(_corners(g, p)) for p in g["parts"]]), ("building", id(o))
        elif o.kind == "road":
            geom, key = LineString([g["p0"], g["p1"]]).buffer(g["hw"] + g["walk"], 4), ("road", g["road"])
        elif o.kind == "tree":
            geom, key = Point(g["cx"], g["cy"]).buffer(g["r"], 4), ("vegetation", o.event, o.present)
        else:
            geom = affinity.scale(Point(0, 0).buffer(1.0, 8), g["ra"], g["rb"], origin=(0, 0))
            geom = affinity.rotate(geom, math.atan2(g["sin"], g["cos"]), (0, 0), use_radians=True)
            geom = affinity.translate(geom, g["cx"], g["cy"])
            key = ("water", id(o))
        grp = groups.setdefault(key, dict(o=o, geoms=[]))
        grp["geoms"].append(geom)
    out, frame = [], box(0, 0, scene.width, scene.height)
    for (obj, *_), grp in groups.items():
        geom = unary_union(grp["geoms"]).intersection(frame).simplify(0.25)
        if geom.is_empty or geom.area < 12:
            continue
        o = grp["o"]
        polys = [p for p in getattr(geom, "geoms", [geom]) if p.geom_type == "Polygon"]
        x0, y0, x1, y1 = geom.bounds
        rec = dict(kind="appeared" if o.present[1] else "vanished", object=obj,
                   bbox=(int(y0), int(x0), int(math.ceil(y1)), int(math.ceil(x1))),
                   polygons=[[(round(y, 1), round(x, 1)) for x, y in p.exterior.coords] for p in polys],
                   area=round(float(geom.area), 1), count=len(grp["geoms"]), event=o.event,
                   centroid=(round(geom.centroid.y, 1), round(geom.centroid.x, 1)))
        if obj == "building":
            rec.update(road=o.g["road"], side=o.g["side"], rside=o.g["rside"],
                       big=bool(o.g["big"] or geom.area > 500 * lay.m ** 2),
                       ground="bareland" if lay.field("soil", o.g["cy"], o.g["cx"]) > 0.5 else "grass")
        elif obj == "road":
            d = np.diff(lay.roads[o.g["road"]]["pts"], axis=0)
            rec["bent"] = bool(np.ptp(np.unwrap(np.arctan2(d[:, 1], d[:, 0]))) > 0.3)
        out.append(rec)
    return out


# -- rendering -------------------------------------------------------------------------------------------

class _Win:
    """A window's global pixel-centre coordinates (shifted for misregistration) and lazy texture fields."""

    def __init__(self, scene: Scene, r0: int, c0: int, h: int, w: int, shift=(0.0, 0.0), textures: bool = True):
        self.r0, self.c0, self.h, self.w = r0, c0, h, w
        self.ys = np.arange(r0, r0 + h, dtype=np.float64) + 0.5 + shift[0]
        self.xs = np.arange(c0, c0 + w, dtype=np.float64) + 0.5 + shift[1]
        m, k = 1.0 / scene.gsd, scene.seed * 7
        if textures:  # fine grain (~1.5 px), mid (3 m) and coarse (15 m) fields shared by all materials
            self.fine, self.mid, self.coarse = (_fbm(self.ys, self.xs, sc, k + i, o)
                                                for i, sc, o in ((1, 1.6, 1), (2, 3 * m, 2), (3, 15 * m, 2)))

    def sub(self, bbox):
        """Slices of the window covered by bbox, and the coordinates there (None if disjoint)."""
        r0, c0 = max(int(math.floor(bbox[0])), self.r0), max(int(math.floor(bbox[1])), self.c0)
        r1, c1 = min(int(math.ceil(bbox[2])), self.r0 + self.h), min(int(math.ceil(bbox[3])), self.c0 + self.w)
        if r0 >= r1 or c0 >= c1:
            return None
        sr, sc = slice(r0 - self.r0, r1 - self.r0), slice(c0 - self.c0, c1 - self.c0)
        return sr, sc, self.ys[sr], self.xs[sc]


def _ground_w(seed: int, ys, xs, m: float) -> tuple:
    """Bare-soil and dry-grass weights of the ground (grass is the rest)."""
    ws = _smooth(0.0, 0.3, _fbm(ys, xs, 90 * m, seed * 7 + 11, 3))
    return ws, _smooth(-0.05, 0.45, _fbm(ys, xs, 40 * m, seed * 7 + 12, 2)) * (1 - ws) * 0.8


def _paved(scene: Scene, ys, xs, m: float) -> np.ndarray:
    """Paved lots: a few parcels of a rectangular grid aligned with the roads (parking lots, yards)."""
    c, s = math.cos(scene.theta), math.sin(scene.theta)
    fu, fv = (xs[None, :] * c + ys[:, None] * s) / (45 * m), (-xs[None, :] * s + ys[:, None] * c) / (30 * m)
    iu, iv = np.floor(fu).astype(np.int64), np.floor(fv).astype(np.int64)
    u0, v0 = iu.min(), iv.min()
    lattice = _hash2(np.arange(u0, iu.max() + 1)[:, None], np.arange(v0, iv.max() + 1)[None, :], scene.seed * 7 + 13)
    pick = lattice[iu - u0, iv - v0] > 0.85
    if not pick.any():
        return np.zeros(pick.shape, np.float32)
    fu, fv = fu - iu, fv - iv
    edge = np.minimum(np.minimum(fu, 1 - fu) * 45 * m, np.minimum(fv, 1 - fv) * 30 * m)
    return (pick * np.clip(edge - 3 * m + 0.5, 0, 1)).astype(np.float32)


def _over(img: np.ndarray, sr, sc, cov: np.ndarray, col: np.ndarray) -> None:
    """Composite colour col over img[:, sr, sc] with coverage cov (in place)."""
    sub = img[:, sr, sc]
    sub += cov.astype(np.float32) * (col - sub)


def _render_float(scene: Scene, window, time: str, nb: int) -> np.ndarray:
    """Reflectance-like (nb, h, w) float32 image of one date before the look's global grading."""
    r0, c0, h, w = window
    look, ti = scene.looks[time], int(time == "after")
    win = _Win(scene, r0, c0, h, w, look.shift)
    m, fine, mid, coarse = 1.0 / scene.gsd, win.fine, win.mid, win.coarse
    col = {k: v[:nb].reshape(nb, 1, 1) for k, v in _MAT.items()}
    ws, wd = _ground_w(scene.seed, win.ys, win.xs, m)
    wp = _paved(scene, win.ys, win.xs, m)
    ws, wd = ws * (1 - wp), wd * (1 - wp)
    wg, tex, grass_tex = 1 - ws - wd - wp, 1 + 0.07 * mid + 0.05 * fine + 0.06 * coarse, 1 + 0.12 * mid + 0.08 * fine
    img = np.empty((nb, h, w), np.float32)
    for b in range(nb):
        img[b] = (wg * grass_tex * (_MAT["grass"][b] * look.veg_tint[b]) + wd * (_MAT["dry"][b] * look.veg_tint[b])
                  + ws * _MAT["soil"][b] + wp * _MAT["pave"][b]) * tex
    layers: dict[str, list] = {}
    for i in scene.query(r0, c0, r0 + h, c0 + w):
        o = scene.objects[i]
        if o.present[ti] and (s := win.sub(o.bbox)) is not None:
            layers.setdefault("lot" if o.kind == "patch" and "parts" in o.g else o.kind, []).append((o.g, *s))
    for g, sr, sc, ys, xs in layers.get("patch", []):  # soft-edged bare soil
        cov = np.clip(0.5 - _sd_blob(g, ys, xs) / (3 * m), 0, 1)
        _over(img, sr, sc, cov, col[g["mat"]] * (1 + 0.08 * mid[sr, sc] + 0.06 * fine[sr, sc]))
    for g, sr, sc, ys, xs in layers.get("water", []):
        if "p0" in g:  # river
            sd = _seg(ys[:, None], xs[None, :], *g["p0"], *g["p1"])[0] - g["hw"] + 1.2 * m * coarse[sr, sc]
            depth = np.clip(-sd / (0.5 * g["hw"]), 0, 1)
        else:
            sd = _sd_blob(g, ys, xs)
            depth = np.clip(-sd / (0.35 * min(g["ra"], g["rb"])), 0, 1)
        water = col["shallow"] + depth * (col["deep"] - col["shallow"])
        _over(img, sr, sc, np.clip(0.5 - sd, 0, 1), water * (1 + 0.04 * mid[sr, sc]))
    roads = [(g, sr, sc, *_seg(ys[:, None], xs[None, :], *g["p0"], *g["p1"]))
             for g, sr, sc, ys, xs in layers.get("road", [])]
    for g, sr, sc, d, t in roads:  # sidewalks first, then surfaces, then paint: crossings stay clean
        if g["walk"] > 0:
            _over(img, sr, sc, np.clip(g["hw"] + g["walk"] + 0.5 - d, 0, 1), col["walk"] * (1 + 0.03 * fine[sr, sc]))
    for g, sr, sc, d, t in roads:
        _over(img, sr, sc, np.clip(g["hw"] + 0.5 - d, 0, 1),
              col[g["mat"]] * g["tone"] * (1 + 0.05 * fine[sr, sc] + 0.04 * mid[sr, sc]))
    for g, sr, sc, d, t in roads:
        if g["paint"]:
            along = g["s0"] + t * math.hypot(g["p1"][0] - g["p0"][0], g["p1"][1] - g["p0"][1])
            dash = ((along / (6 * m)) % 1.0) < 0.5
            _over(img, sr, sc, np.clip(0.15 * m + 0.5 - d, 0, 1) * dash * 0.8, col["paint"])
    for g, sr, sc, ys, xs in layers.get("lot", []):  # driveways, rubble
        cov = np.clip(0.5 - _sd(_Obj("patch", g, (0, 0, 0, 0), (True, True)), ys, xs), 0, 1)
        _over(img, sr, sc, cov, col[g["mat"]] * (1 + 0.12 * mid[sr, sc] + 0.12 * fine[sr, sc]))
    # shadows on the ground (trees, buildings), then trees, building shadows on trees, then roofs
    sx, sy = math.cos(look.sun), math.sin(look.sun)
    sh_t, sh_b = np.zeros((h, w), np.float32), np.zeros((h, w), np.float32)
    for g, sr, sc, ys, xs in layers.get("tree", []):
        ln = g["r"] * 1.6 * look.shadow_len
        d = _seg(ys[:, None], xs[None, :], g["cx"], g["cy"], g["cx"] - sx * ln, g["cy"] - sy * ln)[0]
        np.maximum(sh_t[sr, sc], np.clip(g["r"] * 0.9 + 0.5 - d, 0, 1), out=sh_t[sr, sc])
    for g, sr, sc, ys, xs in layers.get("building", []):
        off = np.array([-sx, -sy]) * g["height"] * look.shadow_len
        for part in g["parts"]:
            cs = _corners(g, part)
            sd = _hull_sd(np.concatenate([cs, cs + off]), ys[:, None], xs[None, :])
            np.maximum(sh_b[sr, sc], np.clip(0.5 - sd, 0, 1), out=sh_b[sr, sc])
    k = 1 - col["shadow"]
    img *= (1 - k * np.maximum(sh_t, sh_b)) / (1 - k * sh_b)
    for g, sr, sc, ys, xs in layers.get("tree", []):
        dx, dy = (xs[None, :] - g["cx"]) / g["r"], (ys[:, None] - g["cy"]) / g["r"]
        dist = np.sqrt(dx * dx + dy * dy)
        cov = np.clip((1 - dist) * g["r"] + 0.5 + 0.9 * fine[sr, sc], 0, 1)  # ragged leafy edge
        shade = np.clip(0.9 + 0.35 * (dx * sx + dy * sy) - 0.25 * dist * dist, 0.4, 1.3)
        _over(img, sr, sc, cov, col["tree"] * look.veg_tint[:nb, None, None] * g["tone"] * shade
              * (1 + 0.25 * fine[sr, sc] + 0.1 * mid[sr, sc]))
    img *= 1 - k * sh_b
    for g, sr, sc, ys, xs in layers.get("building", []):
        roof = _ROOFS[g["col"]][:nb].reshape(nb, 1, 1) * g["tone"]
        for part in g["parts"]:
            sd, u, v = _sd_rect(g, part, ys[:, None], xs[None, :])
            ex, ey = part[2] - np.abs(u), part[3] - np.abs(v)
            if g["roof"] == "flat":  # darker parapet rim, stains
                shade = 1 - 0.12 * (np.minimum(ex, ey) < 0.8 * m) + 0.05 * mid[sr, sc]
            else:  # roof facets lit by the sun: hip roofs have end facets, gable roofs do not
                end = (ex < ey) if g["roof"] == "hip" else np.zeros(ex.shape, bool)
                nu, nv = np.where(end, np.sign(u), 0.0), np.where(end, 0.0, np.sign(v))
                shade = 1 + 0.22 * ((nu * g["cos"] - nv * g["sin"]) * sx + (nu * g["sin"] + nv * g["cos"]) * sy) \
                    + 0.06 * (np.abs(v) < 0.5)
            _over(img, sr, sc, np.clip(0.5 - sd, 0, 1), roof * (shade * (1 + 0.035 * fine[sr, sc])).astype(np.float32))
    return img


def render(scene: Scene, window: tuple[int, int, int, int], time: str = "before", dtype: str = "uint8",
           extra_bands: int = 0) -> np.ndarray:
    """Render window (row_off, col_off, height, width) of one date as (3 + extra_bands, h, w).

    Pixels depend only on global coordinates, so windows tile seamlessly and reproducibly. Bands are
    RGB, then NIR (vegetation bright), SWIR, then NIR/SWIR mixes. uint8 is 1..255, uint16 1..10000
    (reflectance x 10^4), "float32" 0..~1; 0 is never produced, so it can serve as nodata.
    """
    if time not in ("before", "after"):
        raise ValueError(f"time must be 'before' or 'after', not {time!r}")
    r0, c0, h, w = (int(v) for v in window)
    look = scene.looks[time]
    f = _render_float(scene, (r0, c0, h, w), time, 3 + min(extra_bands, 2))
    mix = [(1 - e / (extra_bands + 1)) * f[3] + e / (extra_bands + 1) * f[4] for e in range(1, extra_bands - 1)]
    img = np.stack(list(f[:3 + min(extra_bands, 2)]) + mix)
    img = img * look.gain[np.minimum(np.arange(len(img)), 4)].reshape(-1, 1, 1) + np.float32(look.offset)
    np.clip(img, 0, 1, out=img)
    if look.gamma != 1.0:
        np.power(img, np.float32(look.gamma), out=img)
    rows, cols = np.arange(r0, r0 + h) % 257, np.arange(c0, c0 + w) % 263
    for b in range(len(img)):  # sensor noise: a periodic tile indexed by sensor pixel (not shifted)
        tile = np.random.default_rng([scene.seed, look.noise_seed, b]).standard_normal((257, 263)).astype(np.float32)
        img[b] += np.float32(look.noise) * tile[rows[:, None], cols[None, :]]
    if dtype == "float32":
        return np.clip(img, 1e-4, None)
    top = {"uint8": 255, "uint16": 10000}.get(dtype)
    if top is None:
        raise ValueError(f"unsupported dtype {dtype!r}")
    return np.clip(np.rint(img * top), 1, top).astype(dtype)


def render_mask(scene: Scene, window: tuple[int, int, int, int]) -> np.ndarray:
    """Change mask (h, w) uint8 {0,1} of a window on the before grid: the union of changed footprints."""
    r0, c0, h, w = (int(v) for v in window)
    win, mask = _Win(scene, r0, c0, h, w, textures=False), np.zeros((h, w), np.uint8)
    for i in scene.query(r0, c0, r0 + h, c0 + w):
        o = scene.objects[i]
        if o.kind != "patch" and o.present[0] != o.present[1] and (s := win.sub(o.bbox)) is not None:
            mask[s[0], s[1]] |= (_sd(o, s[2], s[3]) <= 0).astype(np.uint8)
    return mask


# -- captions (LEVIR-CC vocabulary; lower case, no final period) -------------------------------------------

_NUM = {1: "a", 2: "two", 3: "three", 4: "four", 5: "five"}
# Five styles per (object, kind), like LEVIR-CC's five annotators. Fields: q quantity, n noun, be/have/s verb
# agreement, pos position phrase, rel relation to a road, ground land cover, adj road shape, q4 vague quantity.
_TEMPLATES = {
    ("building", "appeared"): ["{q} {n} {be} built {rel} {pos}", "{q} new {n} appear{s} {relpos}",
                               "{q} {n} {be} constructed {ground} {pos}", "{q} {n} {have} been built {rel} {pos}",
                               "{q4} {n} appear{s} {relground}"],
    ("building", "vanished"): ["{q} {n} {be} demolished {pos}", "{q} {n} disappear{s} {pos}",
                               "{q} {n} {be} removed {rel} {pos}", "{q} {n} {be} demolished and replaced by bareland",
                               "{q4} {n} disappear{s}"],
    ("road", "appeared"): ["{q} {n} {be} built {pos}", "{q} new {n} appear{s} {pos}",
                           "{q} {adj} {n} {be} constructed {pos}", "{q} {n} {have} been built {pos}",
                           "{q4} {n} appear{s}"],
    ("vegetation", "vanished"): ["the {n} {pos} {be} removed", "{q} {n} {pos} {be} cut down",
                                 "the vegetation {pos} disappears", "{q} {n} {have} been removed {pos}",
                                 "{q4} {n} {be} removed"],
    ("vegetation", "appeared"): ["{q} {n} {be} planted {pos}", "{q} new {n} appear{s} {pos}", "{q} {n} grow{s} {pos}",
                                 "{q} {n} {have} been planted {pos}", "{q4} {n} {be} planted"],
    ("water", "appeared"): ["{q} {n} appear{s} {pos}", "{q} new {n} {be} built {pos}", "{q} {n} {have} appeared {pos}",
                            "{q} {n} {have} been built {pos}", "{q4} {n} appear{s}"],
    ("water", "vanished"): ["the {n} {pos} {be} filled", "the {n} {pos} disappear{s}", "the water {pos} disappears",
                            "the {n} {have} disappeared {pos}", "the {n} {be} filled"],
}
_ORDER = [("road", "appeared"), ("building", "appeared"), ("building", "vanished"), ("vegetation", "vanished"),
          ("vegetation", "appeared"), ("water", "appeared"), ("water", "vanished")]


def _where(grp: dict, h: int, w: int, style: int) -> str:
    """Position phrase from the changed geometry: corner / top / bottom / left / right / middle."""
    (y0, x0, y1, x1), (cy, cx) = grp["bbox"], grp["centroid"]
    if (y1 - y0) > 0.7 * h and (x1 - x0) > 0.7 * w:
        return ""  # all over the scene
    v = "top" if cy < 0.37 * h else "bottom" if cy > 0.63 * h else ""
    hz = "left" if cx < 0.37 * w else "right" if cx > 0.63 * w else ""
    up = {"top": "upper", "bottom": "lower"}.get(v, "")
    if v and hz:
        return [f"in the {v} {hz} corner", f"in the {up} {hz} corner of the scene", f"at the {v} {hz} corner",
                f"in the {v} {hz} corner of the scene", f"in the {up} {hz} corner"][style]
    if v:
        return f"at the {v}" + " of the scene" * (style % 2)
    if hz:
        return f"on the {hz}" + ["", " side of the scene", " side", "", ""][style]
    return ["in the middle", "in the center", "in the middle of the scene", "in the center of the scene",
            "in the middle"][style]


def _rel(g: dict, style: int, new_road: bool) -> str:
    """Where buildings sit relative to their road, when most of them line one."""
    on = [r for r in g["recs"] if r.get("road") is not None]
    if len(on) < 0.6 * len(g["recs"]):
        return ""
    if len({r["side"] for r in on}) > 1:
        road = "the new road" if new_road and style % 2 else "the road"
        return [f"on both sides of {road}", "along the road", f"on both sides of {road}", "beside the road",
                "along the road"][style]
    side = on[0]["rside"]
    one = f"on the {side} side of the road" if side in ("left", "right") else f"{side} the road"
    return [one, "along the road", "beside the road", one, "next to the road"][style]


def _clause(key: tuple, g: dict, style: int, h: int, w: int, pos: bool, new_road: bool) -> str:
    obj, n = key[0], g["n"]
    one = n == 1
    if obj == "building":
        big = sum(r["big"] for r in g["recs"]) > n / 2
        noun = "building" if big else ["house", "house", "building", "villa", "house"][style]
        q = _NUM.get(n, "many" if n >= 7 else ["some", "several"][style % 2])
        if style == 1 and n >= 3 and key[1] == "appeared" and len({(r["road"], r["side"]) for r in g["recs"]}) == 1 \
                and g["recs"][0]["road"] is not None:
            return f"a row of {noun}s is built along the road"
    else:
        noun = {"road": "road", "vegetation": "tree", "water": "pond"}[obj]
        many = n >= (5 if obj == "road" else 15)
        q = "a" if one else "two" if n == 2 and obj != "vegetation" else "many" if many else "some"
    rel = _rel(g, style, new_road) if obj == "building" else ""
    where = _where(g, h, w, style) if pos else ""
    ground = "on the bareland" if sum(r.get("ground") == "bareland" for r in g["recs"]) > n / 2 else "on the grass"
    text = _TEMPLATES[key][style].format(
        q=q, q4=q if obj == "vegetation" else "a" if one else "many" if n >= 6 else "some",
        n=noun + ("" if one else "s"), be="is" if one else "are", have="has" if one else "have", s="s" if one else "",
        pos=where, rel=rel, relpos=rel or where, ground=ground, relground=rel or ground,
        adj="curved" if any(r.get("bent") for r in g["recs"]) else "straight")
    return " ".join(text.split())


def _captions(scene: Scene) -> list[str]:
    """Five LEVIR-CC-style variants derived from the change records; [0] is the main caption."""
    if not scene.changes:
        return list(NO_CHANGE_CAPTIONS)
    groups: dict = {}
    for r in scene.changes:  # aggregate per (object, kind)
        g = groups.setdefault((r["object"], r["kind"]), dict(recs=[], area=0.0, n=0))
        g["recs"].append(r)
        g["area"] += r["area"]
        g["n"] += r["count"] if r["object"] == "vegetation" else 1
    for g in groups.values():
        recs = g["recs"]
        g["centroid"] = tuple(np.average([r["centroid"] for r in recs], axis=0, weights=[r["area"] for r in recs]))
        g["bbox"] = tuple(f(r["bbox"][i] for r in recs) for i, f in enumerate((min, min, max, max)))
    top = max(g["area"] for g in groups.values())
    keys = [k for k in _ORDER if k in groups and groups[k]["area"] >= 0.12 * top]  # annotators skip trifles
    cut = ("vegetation", "vanished")
    if cut in keys and groups[cut]["area"] > 0.3 * sum(groups[k]["area"] for k in keys):
        keys.insert(0, keys.pop(keys.index(cut)))  # "the trees are removed and ..." reads cause first
    new_road, big = ("road", "appeared") in groups, max(keys, key=lambda k: groups[k]["area"])
    out = []
    for style in range(5):
        if style == 4 and new_road and ("building", "appeared") in keys:
            n = groups[("building", "appeared")]["n"]
            out.append(f"a road with {'a house' if n == 1 else _NUM.get(n, 'many') + ' houses'} appears")
            continue
        use = [big] if style == 3 else keys[:2]  # positions: all but style 4; style 2 only for its first clause
        out.append(" and ".join(_clause(k, groups[k], style, scene.height, scene.width,
                                        style != 4 and (style != 2 or i == 0), new_road) for i, k in enumerate(use)))
    return out


# -- pairs and files ------------------------------------------------------------------------------------------

@dataclass
class SyntheticPair:
    """An in-memory pair with its ground truth (tests, training)."""

    before: np.ndarray  # (bands, H, W)
    after: np.ndarray
    change_mask: np.ndarray  # (H, W) uint8 {0,1}
    captions: list[str]  # 5 variants, [0] main
    changes: list[dict]  # kind, object, bbox (r0, c0, r1, c1), polygons [[(row, col), ...]], area, count, event, ...


@dataclass
class PairFiles:
    """Paths written by :func:`write_pair`."""

    before: Path
    after: Path
    mask: Path
    captions: Path


def _hw(size) -> tuple[int, int]:
    return (int(size), int(size)) if np.isscalar(size) else (int(size[0]), int(size[1]))


def make_pair(size: int | tuple[int, int] = 256, seed: int = 0, change_level: float = 0.5, nuisance: float = 0.5,
              gsd: float = 0.5, dtype: str = "uint8", extra_bands: int = 0, p_no_change: float = 0.0) -> SyntheticPair:
    """Render a whole pair in memory. p_no_change is the chance that the pair gets no change at all (nuisance
    only), to balance caption training like LEVIR-CC's half of no-change pairs."""
    h, w = _hw(size)
    if p_no_change > 0 and np.random.default_rng([seed, 3]).random() < p_no_change:
        change_level = 0.0
    scene = make_scene(h, w, seed, change_level, nuisance, gsd)
    win = (0, 0, h, w)
    before, after = (render(scene, win, t, dtype, extra_bands) for t in ("before", "after"))
    return SyntheticPair(before, after, render_mask(scene, win), list(scene.captions), scene.changes)


def write_pair(out_dir: str | Path, name: str = "pair", size: int | tuple[int, int] = 1024, seed: int = 0,
               crs: str = "EPSG:32633", origin: tuple[float, float] = (500000.0, 5000000.0), gsd: float = 0.5,
               dtype: str = "uint8", extra_bands: int = 0, change_level: float = 0.5, nuisance: float = 0.5,
               block: int = 1024, after_crs: str | None = None, after_gsd: float | None = None,
               progress: bool = False) -> PairFiles:
    """Write {name}_before/_after/_mask.tif (tiled 256, deflate) and {name}_captions.json, block by block.

    origin is the upper-left corner in CRS units. With after_crs / after_gsd the after image is rendered on
    the before grid into a temporary file, then warped (bilinear) into the other CRS / resolution through a
    WarpedVRT, again block by block; outside its footprint it is 0 (nodata). The mask stays on the before grid.
    """
    import rasterio
    from rasterio.crs import CRS
    from rasterio.enums import Resampling
    from rasterio.transform import from_origin
    from rasterio.vrt import WarpedVRT
    from rasterio.warp import calculate_default_transform
    from rasterio.windows import Window

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    h, w = _hw(size)
    block = max(256, int(block) // 256 * 256)
    scene = make_scene(h, w, seed, change_level, nuisance, gsd)
    prof = dict(driver="GTiff", height=h, width=w, count=3 + extra_bands, dtype=dtype, crs=CRS.from_user_input(crs),
                transform=from_origin(origin[0], origin[1], gsd, gsd), tiled=True, blockxsize=256, blockysize=256,
                compress="deflate", predictor=2, interleave="pixel", BIGTIFF="IF_SAFER")
    if extra_bands == 0 and dtype == "uint8":
        prof["photometric"] = "RGB"
    files = PairFiles(*(out / f"{name}_{k}" for k in ("before.tif", "after.tif", "mask.tif", "captions.json")))
    warp = after_crs is not None or after_gsd is not None
    tmp = tempfile.TemporaryDirectory(dir=out) if warp else None
    same_grid_after = Path(tmp.name) / "after.tif" if tmp else files.after

    def blocks(hh: int, ww: int):
        return [Window(c, r, min(block, ww - c), min(block, hh - r))
                for r in range(0, hh, block) for c in range(0, ww, block)]

    todo = blocks(h, w)
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(todo), desc=f"synthetic {name}", unit="block")
    try:
        with rasterio.Env(GDAL_CACHEMAX=256), rasterio.open(files.before, "w", **prof) as db, rasterio.open(same_grid_after, "w", **prof) as da, \
                rasterio.open(files.mask, "w", **dict(prof, count=1, dtype="uint8", photometric="MINISBLACK")) as dm:
            for win in todo:
                box = (win.row_off, win.col_off, win.height, win.width)
                db.write(render(scene, box, "before", dtype, extra_bands), window=win)
                da.write(render(scene, box, "after", dtype, extra_bands), window=win)
                dm.write(render_mask(scene, box)[None], window=win)
                if bar:
                    bar.update()
        if tmp:
            dst_crs = CRS.from_user_input(after_crs or crs)
            with rasterio.Env(GDAL_CACHEMAX=256), rasterio.open(same_grid_after) as src:
                dt, dw, dh = calculate_default_transform(src.crs, dst_crs, w, h, *src.bounds,
                                                         **({"resolution": after_gsd} if after_gsd else {}))
                with WarpedVRT(src, crs=dst_crs, transform=dt, width=dw, height=dh, resampling=Resampling.bilinear,
                               nodata=0) as vrt, rasterio.open(files.after, "w", **dict(
                                   prof, crs=dst_crs, transform=dt, width=dw, height=dh, nodata=0)) as dst:
                    for win in blocks(dh, dw):
                        dst.write(vrt.read(window=win), window=win)
    finally:
        if bar:
            bar.close()
        if tmp:
            tmp.cleanup()
    meta = dict(name=name, captions=scene.captions, changeflag=int(bool(scene.changes)), changes=scene.changes,
                seed=seed, size=[h, w], crs=str(crs), gsd=gsd, origin=list(origin), after_crs=after_crs,
                after_gsd=after_gsd, dtype=dtype, bands=3 + extra_bands, change_level=change_level, nuisance=nuisance,
                misregistration=list(scene.looks["after"].shift))
    files.captions.write_text(json.dumps(meta))
    return files


def main(argv: list[str] | None = None) -> None:
    """Write N synthetic pairs (seeds seed .. seed+N-1) into OUT_DIR."""
    ap = argparse.ArgumentParser(prog="python -m changescribe.training.synthetic", description=main.__doc__)
    ap.add_argument("out_dir")
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--count", type=int, default=1)
    ap.add_argument("--crs", default="EPSG:32633")
    ap.add_argument("--gsd", type=float, default=0.5)
    ap.add_argument("--after-crs", default=None)
    ap.add_argument("--dtype", default="uint8", choices=["uint8", "uint16"])
    ap.add_argument("--extra-bands", type=int, default=0)
    ap.add_argument("--change-level", type=float, default=0.5)
    ap.add_argument("--nuisance", type=float, default=0.5)
    ap.add_argument("--progress", action="store_true")
    a = ap.parse_args(argv)
    for i in range(a.count):
        name = f"pair_{a.seed + i:04d}"
        f = write_pair(a.out_dir, name, a.size, a.seed + i, a.crs, gsd=a.gsd, dtype=a.dtype, extra_bands=a.extra_bands,
                       change_level=a.change_level, nuisance=a.nuisance, after_crs=a.after_crs, progress=a.progress)
        print(f"{f.before.parent / name}: {json.loads(f.captions.read_text())['captions'][0]}")


if __name__ == "__main__":
    main()
