"""Run policy around the pipeline: the probability cache and what to do when the GPU runs out of memory.

:func:`run_request` is the one entry point the CLI, the worker (and so the dock) and the Processing algorithm call with a
:class:`~.api.DetectRequest`. It adds to :func:`.pipeline.detect`:

- **the probability cache** (``request.cache_dir``): each run's probability map is kept there under a key made of
  the two sources (with their size and time), the model's and detector's weights, the area and the tiling, but
  not the device, threshold or minimum area. A run with the same key re-uses the map and does no inference. A
  map that no longer fits (a file replaced in place) is dropped and inference runs again; after a successful run
  the maps of other inputs are deleted.
- **out of memory**: inference and captioning already split a batch in halves down to one tile or caption
  (:func:`.device.halving_on_oom`); if even that fails, the run is repeated on the CPU, and the run says so.

Errors are typed (:mod:`.errors`), so this module branches on classes, never on message text. Importing it needs
only the standard library; the pipeline (torch, rasterio) is imported when a run starts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from .api import DetectRequest
from .errors import DependencyError, InputError, ModelError, OutOfDeviceMemory, StaleProbabilityError
from .run_control import RunControl

if TYPE_CHECKING:
    from .model_api import ChangeModel
    from .pipeline import ChangeResult

CACHE_PREFIX = "probability-"
CPU_FALLBACK_NOTE = "Out of GPU memory even with one tile per batch: running on the CPU instead (slower)."
STALE_CACHE_NOTE = "The cached probability map did not fit these inputs; running the model again."


def run_request(request: DetectRequest, control: RunControl | None = None,
        on_note: Callable[[str], None] | None = None, *, model: "ChangeModel | None" = None) -> "ChangeResult":
    """Run ``request`` with the cache and the out-of-memory policy; ``on_note`` hears what the policy did.
    ``model`` is an already loaded model to run instead of ``request.model`` (Python callers)."""
    control = control or RunControl()
    try:
        from .pipeline import detect
    except ImportError as exc:
        raise DependencyError(f"cannot import what ChangeScribe needs in {sys.executable}: {exc}. Install "
                              "PyTorch, torchvision, safetensors, rasterio and geopandas there") from None
    notes: list[str] = []

    def note(text: str) -> None:
        notes.append(text)
        control.log(text)
        if on_note is not None:
            on_note(text)

    def attempt(req: DetectRequest) -> "ChangeResult":
        try:
            return detect(req, control, model=model)
        except OutOfDeviceMemory:
            if req.device == "cpu":
                raise
            note(CPU_FALLBACK_NOTE)
            return detect(dataclasses.replace(req, device="cpu"), control, model=model)

    result = attempt(request) if request.cache_dir is None else _run_cached(request, attempt, note)
    result.notes[:0] = notes
    return result


def _run_cached(request: DetectRequest, attempt: Callable[[DetectRequest], "ChangeResult"],
                note: Callable[[str], None]) -> "ChangeResult":
    cache_dir = Path(request.cache_dir)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"cannot create the cache folder {cache_dir}: {exc.strerror or exc}") from None
    cached = cache_path(cache_dir, cache_key(request))
    wanted = request.probability_output
    from .pipeline import check_run_outputs

    check_run_outputs(request, RunControl())  # ``wanted`` is written by the copy below, not by the pipeline
    plain = dataclasses.replace(request, cache_dir=None)
    result = None
    if cached.is_file():
        try:
            result = attempt(dataclasses.replace(plain, reuse_probability=str(cached), probability_output=None))
        except StaleProbabilityError:
            prune_cache(cache_dir, None)
            note(STALE_CACHE_NOTE)
    if result is None:
        result = attempt(dataclasses.replace(plain, reuse_probability=None, probability_output=str(cached)))
    prune_cache(cache_dir, cached if cached.exists() else None)
    result.probability = None
    if wanted is not None and cached.exists():
        from .atomic import atomic_path
        from .outputs import writing

        with writing("the probability raster", wanted), atomic_path(Path(wanted), ".tmp.tif") as tmp:
            shutil.copyfile(cached, tmp)
        result.probability = Path(wanted)
    return result


def cache_key(request: DetectRequest) -> str:
    """Identifies a probability map: same sources (and their size/time), model and detector weights, area and
    tiling (and whether border fill is no data). The device, threshold, minimum area, batch size and captions do
    not change the map."""
    def stamp(path: str) -> list:
        try:
            st = os.stat(path)
            return [os.path.abspath(path), st.st_size, int(st.st_mtime)]
        except OSError:
            return [path]

    area = request.area_of_interest.to_dict() if request.area_of_interest is not None else None
    blob = json.dumps([stamp(request.before), stamp(request.after), model_identity(request.model),
                       model_identity(request.detector) if request.detector else None, area, request.tile_size,
                       request.overlap, request.target_gsd]
                      + ([] if request.fill_nodata else ["fill read as image"]), sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def model_identity(name_or_path: str) -> str:
    """The sha256 of a model's weights from its card (no torch), or the name when it cannot be resolved (the run
    then fails on it with a clear message)."""
    from .model_file import read_card
    from .model_loading import find_model

    try:
        return str(read_card(find_model(name_or_path))["sha256"])
    except ModelError:
        return str(name_or_path)


def cache_path(cache_dir: Path, key: str) -> Path:
    return cache_dir / f"{CACHE_PREFIX}{key}.tif"


def prune_cache(cache_dir: Path, keep: Path | None) -> list[Path]:
    """Delete the cached maps of earlier inputs (the cache holds the last inputs only); returns what went."""
    removed: list[Path] = []
    if not cache_dir.is_dir():
        return removed
    for p in sorted(cache_dir.glob(f"{CACHE_PREFIX}*")):
        if keep is not None and p.name.startswith(keep.name):
            continue
        try:
            p.unlink()
            removed.append(p)
        except OSError:
            pass
    return removed
