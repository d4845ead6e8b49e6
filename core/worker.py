"""``python -m changescribe.core.worker``: one ``detect_changes`` job for the QGIS plugin, in another Python.

Why a worker: QGIS's own Python often cannot get PyTorch (no admin rights, DLL clashes, no CUDA build), so the
plugin can run the pipeline in a separate environment instead and talk to it through pipes.

Protocol (JSON lines, UTF-8):

- stdin, first line: the job, ``{"before", "after", "output", "model", "device", "threshold", "min_area",
  "tile_size", "overlap", "batch_size", "target_gsd", "probability_output", "reuse_probability",
  "area_of_interest": {"wkt", "crs"} | null}``. Later stdin lines: ``cancel``. End of stdin also cancels (the
  client went away), unless ``--ignore-stdin-eof`` is given (handy with ``echo JOB | python -m ...``).
- stdout: ``{"event": "log", "message"}``, ``{"event": "device", "device"}``, ``{"event": "progress",
  "fraction", "message"}``, then exactly one ``{"event": "result", ...}`` (exit 0) or ``{"event": "error",
  "message", "kind"}`` (exit 2). Nothing else is ever written to stdout; tracebacks go to stderr.
- SIGTERM / SIGINT cancel like ``cancel``: the pipeline stops at its next check and writes nothing.

``--probe`` prints one ``{"event": "probe", ...}`` line: Python, PyTorch, CUDA and what is missing.

This module is imported by the plugin too (:func:`execute_job`, :func:`error_event`), so at import it needs
only the standard library; torch is imported when a job runs.
"""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading
import traceback
from typing import IO, Any, Callable

from .errors import Cancelled, ChangeScribeError, InputError, ModelError

EXIT_OK, EXIT_ERROR = 0, 2
REQUIRED_MODULES = ("numpy", "rasterio", "geopandas", "shapely", "pyproj", "scipy", "torch", "torchvision",
                    "safetensors")
JOB_KEYS = ("before", "after", "output")


def one_line(text: str) -> str:
    """Messages are shown in a dock label or a message bar: one line, no trailing noise."""
    return " ".join(str(text).split())


def error_kind(exc: BaseException) -> str:
    """A stable name the client branches on (``oom`` triggers the smaller-batch / CPU retries)."""
    text = str(exc).lower()
    if isinstance(exc, Cancelled):
        return "cancelled"
    if "out of gpu memory" in text or type(exc).__name__ == "OutOfMemoryError" or "cuda out of memory" in text:
        return "oom"
    if isinstance(exc, InputError):
        return "input"
    if isinstance(exc, ModelError):
        return "model"
    if isinstance(exc, ImportError):
        return "dependency"
    if isinstance(exc, ChangeScribeError):
        return "error"
    return "internal"


def error_event(exc: BaseException) -> dict[str, Any]:
    kind = error_kind(exc)
    if kind == "dependency":
        message = (f"cannot import what ChangeScribe needs in {sys.executable}: {exc}. Install PyTorch, "
                   "torchvision, safetensors, rasterio and geopandas there")
    elif kind == "oom" and "out of gpu memory" not in str(exc).lower():
        message = f"out of GPU memory: {exc}"
    elif kind == "internal":
        message = f"{type(exc).__name__}: {exc}"
    else:
        message = str(exc)
    return {"event": "error", "message": one_line(message), "kind": kind}


def job_arguments(job: dict[str, Any]) -> dict[str, Any]:
    """The job's fields as ``detect_changes`` keyword arguments (validated: a bad job is an InputError)."""
    missing = [k for k in JOB_KEYS if not job.get(k)]
    if missing:
        raise InputError(f"the job lacks {', '.join(missing)}")
    aoi = None
    if job.get("area_of_interest"):
        from shapely import wkt as shapely_wkt

        from .raster_pair import AreaOfInterest

        spec = job["area_of_interest"]
        try:
            aoi = AreaOfInterest(shapely_wkt.loads(spec["wkt"]), str(spec["crs"]))
        except Exception as exc:  # noqa: BLE001 (shapely's WKT error class differs between 1.8 and 2.x)
            raise InputError(f"the area of interest is not a WKT polygon with a CRS: {exc}") from None
    gsd = job.get("target_gsd")
    return dict(before=job["before"], after=job["after"], model=job.get("model") or "default",
                output=job["output"], threshold=float(job.get("threshold", 0.5)),
                min_area=float(job.get("min_area", 0.0)), tile_size=job.get("tile_size") or None,
                overlap=job.get("overlap"), batch_size=int(job.get("batch_size") or 8),
                device=job.get("device") or "auto", target_gsd=gsd if gsd == "model" else (float(gsd) if gsd else None),
                probability_output=job.get("probability_output") or None,
                reuse_probability=job.get("reuse_probability") or None, area_of_interest=aoi)


def execute_job(job: dict[str, Any], on_progress: Callable[[float, str], None] | None = None,
                on_log: Callable[[str], None] | None = None, is_cancelled: Callable[[], bool] | None = None,
                on_device: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run a job in this Python and return the ``result`` event; raises what ``detect_changes`` raises."""
    from .device import describe_device, resolve_device
    from .pipeline import detect_changes
    from .run_control import RunControl

    control = RunControl(on_progress=on_progress, is_cancelled=is_cancelled, on_log=on_log)
    kwargs = job_arguments(job)
    control.check()
    device = describe_device(resolve_device(kwargs["device"]))
    if on_device is not None:
        on_device(device)
    result = detect_changes(control=control, **kwargs)
    return {"event": "result", "output": str(result.output) if result.output else None,
            "scene_caption": result.scene_caption, "summary": result.summary, "regions": int(len(result.regions)),
            "probability": str(result.probability) if result.probability else None,
            "tiles": int(result.stats.tiles), "reused_probability": kwargs["reuse_probability"] is not None,
            "device": device, "alignment": result.alignment.lines(), "seconds": result.metadata.get("seconds")}


def probe() -> dict[str, Any]:
    """What this Python can run: the plugin shows it before anything runs, and picks the device list from it."""
    import importlib.util

    info: dict[str, Any] = {"event": "probe", "python": sys.executable, "version": sys.version.split()[0],
                            "missing": [m for m in REQUIRED_MODULES if importlib.util.find_spec(m) is None],
                            "torch": None, "torch_error": None, "cuda": False, "gpu": None, "devices": {}}
    try:
        import torch

        from .device import describe_device

        info["torch"] = torch.__version__
        info["cuda"] = bool(torch.cuda.is_available())
        info["devices"]["cpu"] = describe_device(torch.device("cpu"))
        if info["cuda"]:
            info["gpu"] = torch.cuda.get_device_name(0)
            info["devices"]["cuda"] = describe_device(torch.device("cuda"))
        info["devices"]["auto"] = info["devices"]["cuda" if info["cuda"] else "cpu"]
    except Exception as exc:  # noqa: BLE001 (a broken torch install is exactly what the probe reports)
        info["torch_error"] = one_line(f"{type(exc).__name__}: {exc}")
    return info


def suggest(line: str, emit: Callable[[dict[str, Any]], None]) -> int:
    """``--suggest``: one :class:`~changescribe.core.suggestion.SuggestionJob` line in, one
    ``{"event": "suggestion", "caption"}`` (or error) line out: the Annotate panel's suggestion in this Python."""
    try:
        from .suggestion import SuggestionJob, suggest_caption

        job = json.loads(line)
        if not isinstance(job, dict):
            raise InputError("the suggestion job on stdin is not a JSON object")
        emit({"event": "suggestion", "caption": suggest_caption(SuggestionJob.from_dict(job))})
        return EXIT_OK
    except BaseException as exc:  # noqa: BLE001 (every failure becomes one error event)
        if isinstance(exc, ValueError) and not isinstance(exc, ChangeScribeError):
            exc = InputError(f"the suggestion job on stdin is not JSON: {exc}")
        event = error_event(exc)
        if event["kind"] == "internal":
            traceback.print_exc(file=sys.stderr)
        emit(event)
        return EXIT_ERROR


class _Emitter:
    """Writes events to the real stdout, whole lines only, from any thread."""

    def __init__(self, stream: IO[str]):
        self.stream, self.lock = stream, threading.Lock()

    def __call__(self, event: dict[str, Any]) -> None:
        line = json.dumps(event, ensure_ascii=False)
        with self.lock:
            try:
                self.stream.write(line + "\n")
                self.stream.flush()
            except (BrokenPipeError, ValueError):
                pass  # the client is gone; cancellation follows from stdin's end


def _watch_stdin(stream: IO[str], cancel: threading.Event, eof_cancels: bool) -> None:
    for line in stream:
        if line.strip().lower() == "cancel":
            cancel.set()
            return
    if eof_cancels:
        cancel.set()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    cancel = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):  # before any slow import: a terminate must always cancel
        signal.signal(sig, lambda *_: cancel.set())
    emit = _Emitter(sys.stdout)
    sys.stdout = sys.stderr  # a stray print() in a library must not corrupt the protocol
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    if "--probe" in argv:
        emit(probe())
        return EXIT_OK
    if "--suggest" in argv:
        return suggest(sys.stdin.readline(), emit)
    line = sys.stdin.readline()
    try:
        job = json.loads(line)
        if not isinstance(job, dict):
            raise ValueError("not a JSON object")
    except ValueError as exc:
        emit({"event": "error", "message": one_line(f"the job on stdin is not a JSON object: {exc}"), "kind": "job"})
        return EXIT_ERROR
    threading.Thread(target=_watch_stdin, args=(sys.stdin, cancel, "--ignore-stdin-eof" not in argv),
                     daemon=True, name="changescribe-stdin").start()
    try:
        result = execute_job(job, on_progress=lambda f, m: emit({"event": "progress", "fraction": round(f, 5),
                                                                 "message": m}),
                             on_log=lambda m: emit({"event": "log", "message": m}), is_cancelled=cancel.is_set,
                             on_device=lambda d: emit({"event": "device", "device": d}))
    except BaseException as exc:  # noqa: BLE001 (every failure becomes one error event)
        event = error_event(exc)
        if event["kind"] == "internal":
            traceback.print_exc(file=sys.stderr)
        emit(event)
        return EXIT_ERROR
    emit(result)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
