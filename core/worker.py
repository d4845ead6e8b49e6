"""``python -m changescribe.core.worker``: one run for the QGIS plugin, in another Python.

Why a worker: QGIS's own Python often cannot get PyTorch (no admin rights, DLL clashes, no CUDA build), so the
plugin can run the pipeline in a separate environment instead and talk to it through pipes.

Protocol (JSON lines, UTF-8):

- stdin, first line: the job, a :class:`~changescribe.core.api.DetectRequest` as JSON (``to_json``: ``before``,
  ``after``, ``output``, ``model``, ``detector``, ``device``, ``threshold``, ... ``cache_dir``; the area of
  interest as ``{"wkt", "crs"}``). Later stdin lines: ``cancel``. End of stdin also cancels (the client went away),
  unless ``--ignore-stdin-eof`` is given (handy with ``echo JOB | python -m ...``).
- stdout: ``{"event": "log", "message"}``, ``{"event": "device", "device"}``, ``{"event": "progress",
  "fraction", "message"}``, ``{"event": "note", "message"}`` (what the run policy did: a CPU retry, a stale
  cache), then exactly one ``{"event": "result", ...}`` (:meth:`DetectResult.to_event`, exit 0) or
  ``{"event": "error", "message", "kind"}`` (exit 2; ``kind`` is the error class's, :mod:`.errors`). Nothing else
  is ever written to stdout; tracebacks (of ``internal`` errors only) go to stderr.
- SIGTERM / SIGINT cancel like ``cancel``: the pipeline stops at its next check and writes nothing.

``--probe`` prints one ``{"event": "probe", ...}`` line: Python, PyTorch, CUDA and what is missing. ``--suggest``
and ``--import`` (a published checkpoint -> a model file, :func:`import_job`) take one JSON job line each.

This module is imported by the plugin too (:func:`execute`, :func:`error_event`), so at import it needs only the
standard library; torch is imported when a job runs.
"""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading
import traceback
from typing import IO, Any, Callable

from .api import DetectRequest, DetectResult
from .errors import ChangeScribeError, DependencyError, InputError
from .run_control import RunControl

EXIT_OK, EXIT_ERROR = 0, 2
REQUIRED_MODULES = ("numpy", "rasterio", "geopandas", "shapely", "pyproj", "scipy", "torch", "torchvision",
                    "safetensors")


def one_line(text: str) -> str:
    """Messages are shown in a dock label or a message bar: one line, no trailing noise."""
    return " ".join(str(text).split())


def error_kind(exc: BaseException) -> str:
    """A stable name the client branches on: the error class's ``kind`` (:mod:`.errors`)."""
    if isinstance(exc, ChangeScribeError):
        return exc.kind
    if isinstance(exc, ImportError):
        return DependencyError.kind
    return "internal"


def error_event(exc: BaseException) -> dict[str, Any]:
    kind = error_kind(exc)
    if isinstance(exc, ImportError):
        message = (f"cannot import what ChangeScribe needs in {sys.executable}: {exc}. Install PyTorch, "
                   "torchvision, safetensors, rasterio and geopandas there")
    elif kind == "internal":
        message = f"{type(exc).__name__}: {exc}"
    else:
        message = str(exc)
    return {"event": "error", "message": one_line(message), "kind": kind}


def execute(request: DetectRequest, on_event: Callable[[dict[str, Any]], None],
            is_cancelled: Callable[[], bool] | None = None) -> DetectResult:
    """Run ``request`` in this Python (:func:`.run.run_request`), reporting ``log``/``device``/``progress``/``note``
    events; raises what the run raises."""
    from .run import run_request

    control = RunControl(on_progress=lambda f, m: on_event({"event": "progress", "fraction": round(f, 5),
                                                            "message": m}),
                         is_cancelled=is_cancelled, on_log=lambda m: on_event({"event": "log", "message": m}))
    control.check()
    try:
        from .device import describe_device, resolve_device
    except ImportError as exc:
        raise DependencyError(f"cannot import what ChangeScribe needs in {sys.executable}: {exc}. Install "
                              "PyTorch, torchvision, safetensors, rasterio and geopandas there") from None
    on_event({"event": "device", "device": describe_device(resolve_device(request.device))})
    result = run_request(request, control, on_note=lambda m: on_event({"event": "note", "message": m}))
    return result.summary_result()


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


def _one_job(kind: str, line: str, emit: Callable[[dict[str, Any]], None],
             run: Callable[[Any], dict[str, Any]]) -> int:
    """One JSON job line in, ``run``'s event (or one error event) out: what ``--suggest`` and ``--import`` share.
    A line that is not JSON is an input error naming the ``kind`` of job."""
    try:
        emit(run(json.loads(line)))
        return EXIT_OK
    except BaseException as exc:  # noqa: BLE001 (every failure becomes one error event)
        if isinstance(exc, ValueError) and not isinstance(exc, ChangeScribeError):
            exc = InputError(f"the {kind} job on stdin is not JSON: {exc}")
        event = error_event(exc)
        if event["kind"] == "internal":
            traceback.print_exc(file=sys.stderr)
        emit(event)
        return EXIT_ERROR


def suggest(line: str, emit: Callable[[dict[str, Any]], None]) -> int:
    """``--suggest``: one :class:`~changescribe.core.suggestion.SuggestionJob` line in, one
    ``{"event": "suggestion", "caption"}`` (or error) line out: the Annotate panel's suggestion in this Python."""

    def run(job: Any) -> dict[str, Any]:
        from .suggestion import SuggestionJob, suggest_caption

        if not isinstance(job, dict):
            raise InputError("the suggestion job on stdin is not a JSON object")
        return {"event": "suggestion", "caption": suggest_caption(SuggestionJob.from_dict(job))}

    return _one_job("suggestion", line, emit, run)


def import_job(line: str, emit: Callable[[dict[str, Any]], None]) -> int:
    """``--import``: one ``{"checkpoint", "family", "folder", "name", "dataset", "word_map"}`` line in, one
    ``{"event": "imported", "card"}`` (or error) line out: the dock's *Import checkpoint…* in this Python."""

    def run(job: Any) -> dict[str, Any]:
        from .published import import_checkpoint

        if not isinstance(job, dict) or not {"checkpoint", "family", "folder"} <= set(job):
            raise InputError("the import job on stdin is not a JSON object with checkpoint, family and folder")
        card = import_checkpoint(job["checkpoint"], job["family"], job["folder"], name=job.get("name"),
                                 dataset=job.get("dataset"), word_map=job.get("word_map"))
        return {"event": "imported", "card": str(card)}

    return _one_job("import", line, emit, run)


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
    if "--import" in argv:
        return import_job(sys.stdin.readline(), emit)
    line = sys.stdin.readline()
    try:
        job = json.loads(line)
        if not isinstance(job, dict):
            raise ValueError("not a JSON object")
    except ValueError as exc:
        emit({"event": "error", "message": one_line(f"the job on stdin is not a JSON object: {exc}"), "kind": "job"})
        return EXIT_ERROR
    try:
        request = DetectRequest.from_dict(job)
        if not request.output:
            raise InputError("the job lacks output")
    except InputError as exc:  # an option out of range: kind 'input', like any other bad input
        emit(error_event(exc))
        return EXIT_ERROR
    threading.Thread(target=_watch_stdin, args=(sys.stdin, cancel, "--ignore-stdin-eof" not in argv),
                     daemon=True, name="changescribe-stdin").start()
    try:
        result = execute(request, emit, is_cancelled=cancel.is_set)
    except BaseException as exc:  # noqa: BLE001 (every failure becomes one error event)
        event = error_event(exc)
        if event["kind"] == "internal":
            traceback.print_exc(file=sys.stderr)
        emit(event)
        return EXIT_ERROR
    emit(result.to_event())
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
