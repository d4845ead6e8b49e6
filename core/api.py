"""The run contract: one typed request that every entry point builds, and the typed result it gets back.

The CLI, the worker (whose job line *is* a request's JSON), the Processing algorithm and the dock all build a
:class:`DetectRequest` and hand it to :func:`changescribe.core.run.run_request`; none of them copies the run's options
by hand. A request is checked when it is made: a value of the wrong type or out of range raises one
:class:`~.errors.InputError` whose message states the valid range, before anything is read or written.

Importing this module needs only the standard library, so the plugin can build requests in a QGIS without
torch.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import InputError

if TYPE_CHECKING:
    from .raster_pair import AreaOfInterest

# Valid ranges, stated in the messages. A tile below 32 px is smaller than one feature cell of every model; a
# batch of more than MAX_BATCH_PIXELS input pixels (e.g. 8 tiles of 4,096²) cannot be allocated on usual hardware.
MIN_TILE_SIZE, MAX_TILE_SIZE = 32, 8192
MAX_BATCH_SIZE = 1024
MAX_BATCH_PIXELS = 8 * 4096 * 4096
MAX_BEAM_SIZE = 20
DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")
PROBABILITY_SUFFIXES = (".tif", ".tiff")


@dataclass(frozen=True)
class Area:
    """An area of interest as text: polygon WKT and the CRS it is given in (authority id or WKT)."""

    wkt: str
    crs: str

    def to_dict(self) -> dict[str, str]:
        return {"wkt": self.wkt, "crs": self.crs}

    def area_of_interest(self) -> "AreaOfInterest":
        """The geometry the pipeline clips to (shapely is imported here, not when a request is built)."""
        from shapely import wkt as shapely_wkt

        from .raster_pair import AreaOfInterest

        try:
            return AreaOfInterest(shapely_wkt.loads(self.wkt), self.crs)
        except Exception as exc:  # noqa: BLE001 (shapely's WKT error class differs between 1.8 and 2.x)
            raise InputError(f"the area of interest is not a WKT polygon: {exc}") from None


@dataclass(frozen=True)
class DetectRequest:
    """Everything one run of the pipeline needs; valid by construction (see the module docstring).

    ``None`` means "the model's own" for ``tile_size`` and ``beam_size``, an eighth of the tile for ``overlap``,
    and the before raster's resolution for ``target_gsd`` (``"model"``: the model's GSD). ``reuse_probability``
    names an earlier run's probability raster on the same grid (no inference); ``cache_dir`` keeps every run's
    probability map there and re-uses it when the inputs, model, area and tiling are the same
    (:mod:`changescribe.core.run`).
    """

    before: str
    after: str
    output: str | None = None
    model: str = "default"
    detector: str | None = None
    device: str = "auto"
    threshold: float = 0.5
    min_area: float = 0.0
    tile_size: int | None = None
    overlap: int | None = None
    batch_size: int = 8
    target_gsd: float | str | None = None
    area_of_interest: Area | None = None
    captions: bool = True
    beam_size: int | None = None
    probability_output: str | None = None
    reuse_probability: str | None = None
    cache_dir: str | None = None
    overwrite: bool = False  # replace existing output files that ChangeScribe did not write (core.outputs)
    # in a file that declares no NoData, constant black/white fill touching the border is no data (raster_pair)
    fill_nodata: bool = True
    # on the CPU, the change encoder and mask head run on ONNX Runtime when it is installed (core.onnx_export)
    onnxruntime: bool = True

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, _COERCE[f.name](f.name, getattr(self, f.name)))
        self.validate()

    def validate(self) -> None:
        """Raise one :class:`InputError` naming the first option out of range and the range it must be in."""
        for name in ("before", "after", "model"):
            if not getattr(self, name):
                raise InputError(f"{_label(name)} must be given")
        if not 0.0 < self.threshold < 1.0:
            raise InputError(f"threshold must be {RANGES['threshold']}, got {self.threshold:g}")
        if self.min_area < 0.0:
            raise InputError(f"min area must be {RANGES['min_area']}, got {self.min_area:g}")
        check_tiling(self.tile_size, self.overlap, self.batch_size)
        if self.target_gsd is not None and self.target_gsd != "model" and not self.target_gsd > 0.0:
            raise InputError(f"gsd must be {RANGES['target_gsd']}, got {self.target_gsd:g}")
        if self.beam_size is not None and not 1 <= self.beam_size <= MAX_BEAM_SIZE:
            raise InputError(f"beam size must be {RANGES['beam_size']}, got {self.beam_size}")
        if not DEVICE_PATTERN.match(self.device):
            raise InputError(f"unknown device {self.device!r}: use auto, cpu or cuda[:N]")
        if self.output is not None and Path(self.output).suffix.lower() != ".gpkg":
            raise InputError(f"output must be a GeoPackage (.gpkg): {self.output}")
        if self.probability_output is not None and \
                Path(self.probability_output).suffix.lower() not in PROBABILITY_SUFFIXES:
            raise InputError(f"the probability raster must be a GeoTIFF (.tif): {self.probability_output}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready values (the area as ``{"wkt", "crs"}``)."""
        return {f.name: (v.to_dict() if isinstance(v := getattr(self, f.name), Area) else v)
                for f in dataclasses.fields(self)}

    def to_json(self) -> str:
        """One line of JSON (the worker's job line); equal requests give equal text."""
        return json.dumps(self.to_dict(), sort_keys=True, ensure_ascii=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "DetectRequest":
        """A request from JSON values; unknown keys and bad values are an :class:`InputError`."""
        if not isinstance(data, dict):
            raise InputError("a run request must be a JSON object")
        unknown = sorted(set(data) - set(FIELDS))
        if unknown:
            raise InputError(f"unknown run option(s) {', '.join(unknown)}; known: {', '.join(FIELDS)}")
        missing = [k for k in ("before", "after") if not data.get(k)]
        if missing:
            raise InputError(f"the run request lacks {' and '.join(missing)}")
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> "DetectRequest":
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise InputError(f"the run request is not JSON: {exc}") from None
        return cls.from_dict(data)

    def aoi(self) -> "AreaOfInterest | None":
        """The area of interest as the pipeline's geometry, or None for the whole overlap."""
        return self.area_of_interest.area_of_interest() if self.area_of_interest is not None else None

    def effective_overlap(self, tile_size: int) -> int:
        """The overlap a run at ``tile_size`` uses (an eighth of the tile when none was given)."""
        return tile_size // 8 if self.overlap is None else self.overlap


FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(DetectRequest))


def check_tiling(tile_size: int | None, overlap: int | None, batch_size: int) -> None:
    """Tile size, overlap and batch size in range; the pipeline calls it again with the model's tile size."""
    if tile_size is not None and not MIN_TILE_SIZE <= tile_size <= MAX_TILE_SIZE:
        raise InputError(f"tile size must be {RANGES['tile_size']}, got {tile_size}")
    if overlap is not None:
        if overlap < 0:
            raise InputError(f"overlap must be {RANGES['overlap']}, got {overlap}")
        if tile_size is not None and overlap >= tile_size:
            raise InputError(f"overlap must be less than the tile size ({tile_size} px), got {overlap}")
    if not 1 <= batch_size <= MAX_BATCH_SIZE:
        raise InputError(f"batch size must be {RANGES['batch_size']}, got {batch_size}")
    if tile_size is not None and batch_size * tile_size * tile_size > MAX_BATCH_PIXELS:
        raise InputError(f"a batch of {batch_size} tiles of {tile_size}² px is too large to allocate: tile size² × "
                         f"batch size must be at most {MAX_BATCH_PIXELS:,} pixels; lower the tile size or the "
                         "batch size")


# What each numeric option must be, as every message about it says.
RANGES = {
    "threshold": "between 0 and 1 (exclusive)", "min_area": "0 or more square metres",
    "tile_size": f"between {MIN_TILE_SIZE} and {MAX_TILE_SIZE} pixels (or the model's)",
    "overlap": "0 or more pixels and less than the tile size", "batch_size": f"between 1 and {MAX_BATCH_SIZE} tiles",
    "target_gsd": "more than 0 metres per pixel (or 'model')", "beam_size": f"between 1 and {MAX_BEAM_SIZE} (1 = greedy)",
}


def _label(name: str) -> str:
    return {"target_gsd": "gsd"}.get(name, name.replace("_", " "))


def _text(name: str, value: Any) -> str:
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str):
        raise InputError(f"{_label(name)} must be text, got {value!r}")
    return value


def _optional_text(name: str, value: Any) -> str | None:
    return None if value is None or value == "" else _text(name, value)


def _number(name: str, value: Any) -> float:
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InputError(f"{_label(name)} must be a number {RANGES.get(name, '')}, got {value!r}")
    return float(value)


def _integer(name: str, value: Any) -> int:
    if isinstance(value, str):
        try:
            value = int(value.strip())
        except ValueError:
            pass
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise InputError(f"{_label(name)} must be a whole number {RANGES.get(name, '')}, got {value!r}")
    return value


def _optional_integer(name: str, value: Any) -> int | None:
    return None if value is None or value == "" else _integer(name, value)


def _gsd(name: str, value: Any) -> float | str | None:
    if value is None or value == "":
        return None
    if isinstance(value, str) and value.strip().lower() == "model":
        return "model"
    return _number(name, value)


def _flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise InputError(f"{_label(name)} must be true or false, got {value!r}")
    return value


def _area(name: str, value: Any) -> Area | None:
    if value is None:
        return value
    if isinstance(value, dict) and isinstance(value.get("wkt"), str) and isinstance(value.get("crs"), str) \
            and set(value) == {"wkt", "crs"}:
        value = Area(value["wkt"], value["crs"])
    if isinstance(value, Area) and value.wkt.strip() and value.crs.strip():
        return value
    raise InputError(f"the area of interest must be a polygon (WKT) with its CRS, got {value!r}")


def _device(name: str, value: Any) -> str:
    return (_optional_text(name, value) or "auto").strip().lower()


_COERCE = {
    "before": _text, "after": _text, "output": _optional_text, "model": lambda n, v: _optional_text(n, v) or "default",
    "detector": _optional_text, "device": _device, "threshold": _number, "min_area": _number,
    "tile_size": _optional_integer, "overlap": _optional_integer, "batch_size": _integer, "target_gsd": _gsd,
    "area_of_interest": _area, "captions": _flag, "fill_nodata": _flag, "beam_size": _optional_integer,
    "probability_output": _optional_text, "reuse_probability": _optional_text, "cache_dir": _optional_text,
    "overwrite": _flag, "onnxruntime": _flag,
}


@dataclass(frozen=True)
class DetectResult:
    """What a run produced, as plain values: what the CLI prints, the worker sends and the dock shows."""

    output: str | None
    regions: int
    scene_caption: str
    summary: str
    flagged: int = 0  # regions whose decoder caption contradicts their facts (a caption_flag)
    probability: str | None = None
    tiles: int = 0
    tiles_per_second: float | None = None
    reused_probability: bool = False
    device: str = ""
    alignment: tuple[str, ...] = ()
    seconds: float | None = None
    notes: tuple[str, ...] = field(default=())

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["alignment"], d["notes"] = list(self.alignment), list(self.notes)
        return d

    def to_event(self) -> dict[str, Any]:
        """The worker protocol's final ``result`` line."""
        return {"event": "result", **self.to_dict()}

    @classmethod
    def from_event(cls, event: dict[str, Any]) -> "DetectResult":
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in event.items() if k in known}
        values["alignment"] = tuple(values.get("alignment") or ())
        values["notes"] = tuple(values.get("notes") or ())
        return cls(**values)
