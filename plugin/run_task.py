"""One change-detection run as a QgsTask, in QGIS's Python or through the worker.

The task only computes and reports; loading layers and touching widgets happens on the main thread in the
dock when :attr:`ChangeTask.done` fires. The run's policy (the probability cache, the out-of-memory fallback)
is core's (:func:`changescribe.core.run.run_request`), so it behaves the same in both places and for the CLI.
"""

from __future__ import annotations

import time
import traceback
from dataclasses import dataclass, field
from typing import Any

from qgis.core import Qgis, QgsMessageLog, QgsTask
from qgis.PyQt.QtCore import pyqtSignal

from ..core.api import DetectRequest, DetectResult
from ..core.errors import Cancelled, ChangeScribeError, DependencyError
from ..core.worker import one_line

LOG_TAG = "ChangeScribe"


@dataclass
class RunJob:
    """A run decided on the main thread (the task never reads widgets): the request and where it runs."""

    request: DetectRequest
    python: str | None  # None: QGIS's own Python; else the worker's interpreter
    title: str


@dataclass
class RunOutcome:
    """What the dock shows when the task ends; ``result`` is :meth:`DetectResult.to_dict`."""

    result: dict[str, Any] | None = None
    error: str | None = None
    kind: str | None = None
    cancelled: bool = False
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0


def _run_in_qgis_python(request: DetectRequest, on_event, is_cancelled) -> DetectResult:
    from ..core.worker import execute

    try:
        return execute(request, on_event, is_cancelled)
    except (ImportError, DependencyError) as exc:
        raise DependencyError(f"PyTorch or another dependency cannot be imported in QGIS's Python ({exc}); "
                              "install it, or choose a separate Python environment in the dock's Settings") from None


class ChangeTask(QgsTask):
    """Runs a :class:`RunJob` off the main thread; events arrive on the main thread via :attr:`message`."""

    message = pyqtSignal(object)  # a worker-protocol event dict (log, device, progress, note); not "event":
    # QObject.event() is what Qt calls to deliver events
    done = pyqtSignal(object)  # the RunOutcome, emitted from finished() on the main thread

    def __init__(self, job: RunJob):
        super().__init__(job.title, QgsTask.Flag.CanCancel)
        self.job = job
        self.outcome = RunOutcome()

    def _on_event(self, event: dict[str, Any]) -> None:
        if event.get("event") == "progress":
            self.setProgress(100.0 * float(event.get("fraction", 0.0)))
        self.message.emit(event)

    def run(self) -> bool:  # noqa: D102 (QgsTask)
        started = time.monotonic()
        try:
            if self.job.python:
                from .worker_client import run_worker

                result = run_worker(self.job.python, self.job.request, self._on_event, self.isCanceled)
            else:
                result = _run_in_qgis_python(self.job.request, self._on_event, self.isCanceled)
            if self.isCanceled():
                raise Cancelled("cancelled by the user; nothing was written")
            self.outcome.result = result.to_dict()
            self.outcome.notes = list(result.notes)
            return True
        except Cancelled:
            self.outcome.cancelled = True
        except ChangeScribeError as exc:
            self.outcome.error, self.outcome.kind = one_line(str(exc)), exc.kind
        except Exception as exc:  # noqa: BLE001 (shown in the dock; the traceback goes to the log panel)
            QgsMessageLog.logMessage(traceback.format_exc(), LOG_TAG, Qgis.MessageLevel.Critical)
            self.outcome.error = one_line(f"unexpected error: {type(exc).__name__}: {exc} (details in the Log "
                                          "Messages panel, ChangeScribe tab)")
            self.outcome.kind = "internal"
        finally:
            self.outcome.seconds = time.monotonic() - started
        return False

    def finished(self, ok: bool) -> None:  # noqa: D102 (QgsTask; main thread)
        if not ok and self.outcome.error is None:
            self.outcome.cancelled = True
        self.done.emit(self.outcome)

    def cancel(self) -> None:  # noqa: D102
        self.message.emit({"event": "log", "message": "cancelling…"})
        super().cancel()
