"""Runs :mod:`changescribe.core.worker` in a separate Python and relays its JSON-line events.

Called from a QgsTask's thread, so it blocks and uses ``subprocess`` (a QProcess would need an event loop in
that thread). Cancelling asks the worker to stop (``cancel`` line, then end of stdin), then terminates, then
kills it; the worker's temporary folder is ours and is removed whatever happens, so nothing is left behind.
"""

from __future__ import annotations

import collections
import json
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

from ..core.api import DetectRequest, DetectResult
from ..core.errors import Cancelled, ChangeScribeError, error_for_kind

WORKER_MODULE = "changescribe.core.worker"
# Not resolved: QGIS may load the plugin through a link named changescribe, whose parent is what PYTHONPATH needs.
PLUGIN_PARENT = str(Path(__file__).absolute().parent.parent.parent)


class WorkerError(ChangeScribeError):
    """The worker could not be started, did not answer, or died without a result. (An error the worker reports
    comes back as the error class of its ``kind``, :func:`changescribe.core.errors.error_for_kind`.)"""

    def __init__(self, message: str, kind: str = "error"):
        super().__init__(message)
        self.kind = kind


def worker_environment(plugin_parent: str, tmp_dir: str | None = None) -> dict[str, str]:
    """QGIS's environment minus its Python settings (they are for another Python), plus our package."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
    env["PYTHONPATH"] = plugin_parent
    env["PYTHONIOENCODING"] = "utf-8"
    env["PYTHONUNBUFFERED"] = "1"
    if tmp_dir:
        env.update(TMPDIR=tmp_dir, TEMP=tmp_dir, TMP=tmp_dir)
    return env


def _popen(python: str, args: list[str], env: dict[str, str], cwd: str) -> subprocess.Popen:
    flags = getattr(subprocess, "CREATE_NO_WINDOW", 0) if sys.platform == "win32" else 0
    try:
        return subprocess.Popen([python, "-m", WORKER_MODULE, *args], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, encoding="utf-8",
                                errors="replace", env=env, cwd=cwd, creationflags=flags)
    except OSError as exc:
        raise WorkerError(f"cannot start the worker Python {python}: {exc.strerror or exc}", "dependency") from None


def _one_shot(python: str, flag: str, stdin: str | None, timeout: float, late: str, kind: str,
              plugin_parent: str) -> tuple[list[dict[str, Any]], str, int]:
    """Run the worker once with ``flag`` in a temporary folder of its own: (its JSON events, the last line of its
    stderr, its exit code). Past ``timeout`` it is killed and ``late`` is raised as a :class:`WorkerError`."""
    tmp = tempfile.mkdtemp(prefix=f"changescribe-{flag.strip('-')}-")
    try:
        proc = _popen(python, [flag], worker_environment(plugin_parent, tmp), tmp)
        try:
            out, err = proc.communicate(stdin, timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise WorkerError(f"{python} {late} within {timeout:.0f} s", kind) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    events = []
    for line in out.splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict):
            events.append(event)
    return events, (err.strip().splitlines() or ["no output"])[-1], proc.returncode


def probe_python(python: str, plugin_parent: str = PLUGIN_PARENT, timeout: float = 120.0) -> dict[str, Any]:
    """The worker's ``--probe`` answer (PyTorch version, CUDA, GPU name, missing modules)."""
    events, tail, _ = _one_shot(python, "--probe", None, timeout, "did not answer", "dependency", plugin_parent)
    for event in events:
        if event.get("event") == "probe":
            return event
    raise WorkerError(f"{python} cannot run ChangeScribe's worker: {tail}", "dependency")


def suggest_in_python(python: str, job: dict[str, Any], plugin_parent: str = PLUGIN_PARENT,
                      timeout: float = 600.0) -> str:
    """The Annotate panel's suggested caption, computed by the worker in ``python`` (``--suggest``); raises
    :class:`WorkerError` with the worker's message and kind when it could not."""
    events, tail, code = _one_shot(python, "--suggest", json.dumps(job) + "\n", timeout,
                                   "did not suggest a caption", "internal", plugin_parent)
    for event in events:
        if event.get("event") == "suggestion":
            return str(event.get("caption") or "")
        if event.get("event") == "error":
            raise WorkerError(event.get("message") or "the worker failed", event.get("kind") or "error")
    raise WorkerError(f"the worker stopped (exit code {code}) without a suggestion: {tail}", "internal")


def import_in_python(python: str, job: dict[str, Any], plugin_parent: str = PLUGIN_PARENT,
                     timeout: float = 600.0) -> str:
    """The dock's *Import checkpoint…* run by the worker in ``python`` (``--import``): the new card's path, or
    :class:`WorkerError` with the worker's one-line message and kind."""
    events, tail, code = _one_shot(python, "--import", json.dumps(job) + "\n", timeout,
                                   "did not import the checkpoint", "internal", plugin_parent)
    for event in events:
        if event.get("event") == "imported":
            return str(event.get("card") or "")
        if event.get("event") == "error":
            raise WorkerError(event.get("message") or "the worker failed", event.get("kind") or "error")
    raise WorkerError(f"the worker stopped (exit code {code}) without importing: {tail}", "internal")


def _pump(stream, sink: Callable[[str], None]) -> None:
    for line in stream:
        sink(line)


def run_worker(python: str, request: DetectRequest, on_event: Callable[[dict[str, Any]], None],
               is_cancelled: Callable[[], bool], plugin_parent: str = PLUGIN_PARENT,
               grace_s: float = 3.0) -> DetectResult:
    """Run one request to completion in ``python``; raises the typed error the worker reported (its ``kind``),
    :class:`WorkerError` when it died, or ``Cancelled``."""
    tmp = tempfile.mkdtemp(prefix="changescribe-worker-")
    lines: queue.Queue[str | None] = queue.Queue()
    stderr_tail: collections.deque[str] = collections.deque(maxlen=40)
    try:
        proc = _popen(python, [], worker_environment(plugin_parent, tmp), tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    cancelled = False
    final: dict[str, Any] | None = None
    try:
        threading.Thread(target=lambda: (_pump(proc.stdout, lines.put), lines.put(None)), daemon=True).start()
        threading.Thread(target=_pump, args=(proc.stderr, stderr_tail.append), daemon=True).start()
        proc.stdin.write(request.to_json() + "\n")
        proc.stdin.flush()
        while True:
            if is_cancelled() and not cancelled:
                cancelled = True
                _stop(proc, grace_s)
            try:
                line = lines.get(timeout=0.1)
            except queue.Empty:
                continue
            if line is None:
                break
            try:
                event = json.loads(line)
            except ValueError:
                continue  # not ours; the worker only writes JSON, but a crashing interpreter may not
            if not isinstance(event, dict):
                continue
            if event.get("event") in ("result", "error"):
                final = event
            else:
                on_event(event)
        proc.wait()
    except BaseException:
        _stop(proc, grace_s)
        raise
    finally:
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            try:
                stream.close()
            except (OSError, ValueError):
                pass
        shutil.rmtree(tmp, ignore_errors=True)
        if cancelled or (final is None or final.get("event") != "result"):
            _remove_partial_outputs(request, proc.pid)
    if cancelled or (final is not None and final.get("kind") == "cancelled"):
        raise Cancelled("cancelled by the user; nothing was written")
    if final is None:
        tail = next((s.strip() for s in reversed(stderr_tail) if s.strip()), "no message")
        raise WorkerError(f"the worker stopped (exit code {proc.returncode}) without a result: {tail}", "internal")
    if final["event"] == "error":
        raise error_for_kind(final.get("kind") or "error", final.get("message") or "the worker failed")
    return DetectResult.from_event(final)


def _stop(proc: subprocess.Popen, grace_s: float) -> None:
    """Ask, then terminate (SIGTERM also cancels in the worker), then kill."""
    if proc.poll() is not None:
        return
    try:
        proc.stdin.write("cancel\n")
        proc.stdin.flush()
        proc.stdin.close()
    except (OSError, ValueError):
        pass
    for action in (None, proc.terminate, proc.kill):
        if action is not None:
            action()
        deadline = time.monotonic() + grace_s
        while proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        if proc.poll() is not None:
            return


def _remove_partial_outputs(request: DetectRequest, pid: int) -> None:
    """After the worker died (killed, crashed), remove the temporaries it left beside the outputs: exactly those
    named with its process id (:func:`changescribe.core.atomic.remove_temporaries`), nobody else's."""
    from ..core.atomic import remove_temporaries

    folders = {Path(p).parent for p in (request.output, request.probability_output) if p}
    if request.cache_dir:
        folders.add(Path(request.cache_dir))
    for folder in folders:
        remove_temporaries(folder, pid)
