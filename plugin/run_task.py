"""One change-detection run as a QgsTask: in QGIS's Python or through the worker, with retries and a cache.

The task only computes and reports; loading layers and touching widgets happens on the main thread in the
dock when :attr:`ChangeTask.done` fires. Retries on CUDA out-of-memory (one tile per batch, then the CPU) and
the probability cache (a new threshold or minimum area re-uses the last run's probability map) live here
because both must behave the same for both execution paths.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from qgis.core import Qgis, QgsMessageLog, QgsTask
from qgis.PyQt.QtCore import pyqtSignal

from ..core.errors import Cancelled, ChangeScribeError
from ..core.worker import error_kind, one_line

CACHE_PREFIX = "probability-"
LOG_TAG = "ChangeScribe"


@dataclass
class RunRequest:
    """Everything a run needs, decided on the main thread (the task never reads widgets)."""

    job: dict[str, Any]
    python: str | None  # None: QGIS's own Python; else the worker's interpreter
    title: str
    cache_dir: Path
    cache_key: str
    probability_copy: Path | None = None  # where the probability layer's file goes, when one was asked for


@dataclass
class RunOutcome:
    """What the dock shows when the task ends; ``result`` is the worker protocol's ``result`` event."""

    result: dict[str, Any] | None = None
    error: str | None = None
    kind: str | None = None
    cancelled: bool = False
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0


def cache_key(before: str, after: str, model_card: dict[str, Any] | str, aoi: dict | None, tile_size: int,
              overlap: int, target_gsd: str | float | None) -> str:
    """Identifies a probability map: same sources (and their size/time), model weights, AOI and tiling.

    The device, threshold and minimum area are not part of it: they do not change the map.
    """
    def stamp(path: str) -> list:
        try:
            st = os.stat(path)
            return [os.path.abspath(path), st.st_size, int(st.st_mtime)]
        except OSError:
            return [path]

    model = (model_card.get("sha256") or model_card.get("path")) if isinstance(model_card, dict) else str(model_card)
    blob = json.dumps([stamp(before), stamp(after), model, aoi, tile_size, overlap, target_gsd], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def cache_path(cache_dir: Path, key: str) -> Path:
    return cache_dir / f"{CACHE_PREFIX}{key}.tif"


def prune_cache(cache_dir: Path, keep: Path | None) -> list[Path]:
    """Delete the cached maps of earlier inputs (the cache holds the last inputs only); returns what went."""
    removed = []
    if not cache_dir.is_dir():
        return removed
    for p in cache_dir.glob(f"{CACHE_PREFIX}*"):
        if keep is not None and p.name.startswith(keep.name):
            continue
        try:
            p.unlink()
            removed.append(p)
        except OSError:
            pass
    return removed


def prepare_cache(job: dict[str, Any], cache_dir: Path, key: str) -> bool:
    """Point the job at the cache: re-use it when it exists, else write it. True when re-using."""
    path = cache_path(cache_dir, key)
    if path.is_file():
        job["reuse_probability"], job["probability_output"] = str(path), None
        return True
    job["reuse_probability"], job["probability_output"] = None, str(path)
    return False


def run_with_fallback(job: dict[str, Any], run_once: Callable[[dict[str, Any]], dict[str, Any]],
                      note: Callable[[str], None]) -> dict[str, Any]:
    """Run; on CUDA out-of-memory retry with one tile per batch, then on the CPU, saying so each time."""
    try:
        return run_once(job)
    except ChangeScribeError as exc:
        if _kind(exc) != "oom" or job.get("device") == "cpu":
            raise
    batch = int(job.get("batch_size") or 8)
    if batch > 1:
        note(f"Out of GPU memory with {batch} tiles per batch: retrying with 1 tile per batch.")
        try:
            return run_once({**job, "batch_size": 1})
        except ChangeScribeError as exc:
            if _kind(exc) != "oom":
                raise
    note("Out of GPU memory even with 1 tile per batch: running on the CPU instead (slower).")
    return run_once({**job, "device": "cpu"})


def _kind(exc: BaseException) -> str:
    return getattr(exc, "kind", None) or error_kind(exc)


def _run_in_qgis_python(job: dict[str, Any], on_event: Callable[[dict], None],
                        is_cancelled: Callable[[], bool]) -> dict[str, Any]:
    try:
        from ..core.worker import execute_job

        return execute_job(job, on_progress=lambda f, m: on_event({"event": "progress", "fraction": f, "message": m}),
                           on_log=lambda m: on_event({"event": "log", "message": m}), is_cancelled=is_cancelled,
                           on_device=lambda d: on_event({"event": "device", "device": d}))
    except ImportError as exc:
        err = ChangeScribeError(f"PyTorch or another dependency cannot be imported in QGIS's Python ({exc}); "
                                "install it, or choose a separate Python environment in the dock's Settings")
        err.kind = "dependency"  # type: ignore[attr-defined]
        raise err from None


class ChangeTask(QgsTask):
    """Runs :class:`RunRequest` off the main thread; events arrive on the main thread via :attr:`message`."""

    message = pyqtSignal(object)  # a worker-protocol event dict (log, device, progress, note); not "event":
    # QObject.event() is what Qt calls to deliver events
    done = pyqtSignal(object)  # the RunOutcome, emitted from finished() on the main thread

    def __init__(self, request: RunRequest):
        super().__init__(request.title, QgsTask.Flag.CanCancel)
        self.request = request
        self.outcome = RunOutcome()

    def _on_event(self, event: dict[str, Any]) -> None:
        if event.get("event") == "progress":
            self.setProgress(100.0 * float(event.get("fraction", 0.0)))
        self.message.emit(event)

    def _note(self, text: str) -> None:
        self.outcome.notes.append(text)
        self.message.emit({"event": "note", "message": text})

    def _run_once(self, job: dict[str, Any]) -> dict[str, Any]:
        if self.request.python:
            from .worker_client import run_worker

            return run_worker(self.request.python, job, self._on_event, self.isCanceled)
        return _run_in_qgis_python(job, self._on_event, self.isCanceled)

    def _run_cached(self, job: dict[str, Any]) -> dict[str, Any]:
        """A cache that does not fit (e.g. a file was replaced in place) is dropped and inference runs again."""
        try:
            return run_with_fallback(job, self._run_once, self._note)
        except ChangeScribeError as exc:
            if not job.get("reuse_probability") or "probability raster" not in str(exc):
                raise
        prune_cache(self.request.cache_dir, None)
        self._note("The cached probability map did not fit these inputs; running the model again.")
        job = {**job, "reuse_probability": None, "probability_output": str(cache_path(self.request.cache_dir,
                                                                                     self.request.cache_key))}
        return run_with_fallback(job, self._run_once, self._note)

    def run(self) -> bool:  # noqa: D102 (QgsTask)
        started = time.monotonic()
        try:
            self.request.cache_dir.mkdir(parents=True, exist_ok=True)
            result = self._run_cached(dict(self.request.job))
            if self.isCanceled():
                raise Cancelled("cancelled by the user; nothing was written")
            self._finish_files(result)
            self.outcome.result = result
            return True
        except Cancelled:
            self.outcome.cancelled = True
        except ChangeScribeError as exc:
            self.outcome.error, self.outcome.kind = one_line(str(exc)), _kind(exc)
        except Exception as exc:  # noqa: BLE001 (shown in the dock; the traceback goes to the log panel)
            QgsMessageLog.logMessage(traceback.format_exc(), LOG_TAG, Qgis.MessageLevel.Critical)
            self.outcome.error = one_line(f"unexpected error: {type(exc).__name__}: {exc} (details in the Log "
                                          "Messages panel, ChangeScribe tab)")
            self.outcome.kind = "internal"
        finally:
            self.outcome.seconds = time.monotonic() - started
        return False

    def _finish_files(self, result: dict[str, Any]) -> None:
        """The cache now holds this run's inputs: drop other maps; copy the map out if a layer was asked for."""
        cache = cache_path(self.request.cache_dir, self.request.cache_key)
        prune_cache(self.request.cache_dir, cache if cache.exists() else None)
        copy = self.request.probability_copy
        if copy is not None and cache.exists():
            copy.parent.mkdir(parents=True, exist_ok=True)
            tmp = copy.with_name(f".{copy.stem}.tmp.tif")
            shutil.copyfile(cache, tmp)
            os.replace(tmp, copy)
            result["probability"] = str(copy)
        else:
            result["probability"] = None

    def finished(self, ok: bool) -> None:  # noqa: D102 (QgsTask; main thread)
        if not ok and self.outcome.error is None:
            self.outcome.cancelled = True
        self.done.emit(self.outcome)

    def cancel(self) -> None:  # noqa: D102
        self.message.emit({"event": "log", "message": "cancelling…"})
        super().cancel()
