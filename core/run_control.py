"""Progress reporting and cancellation, shared by the CLI (tqdm), QgsTask and processing feedback."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from .errors import Cancelled


@dataclass
class RunControl:
    """Callbacks a long run polls; a stage reports its own 0..1 progress mapped into [start, end]."""

    on_progress: Callable[[float, str], None] | None = None
    is_cancelled: Callable[[], bool] | None = None
    on_log: Callable[[str], None] | None = None
    _range: tuple[float, float] = field(default=(0.0, 1.0), repr=False)

    def stage(self, start: float, end: float) -> "RunControl":
        """A view of this control whose 0..1 maps onto [start, end] of the whole run."""
        lo, hi = self._range
        return RunControl(self.on_progress, self.is_cancelled, self.on_log,
                          (lo + (hi - lo) * start, lo + (hi - lo) * end))

    def progress(self, fraction: float, message: str = "") -> None:
        if self.on_progress is not None:
            lo, hi = self._range
            self.on_progress(lo + (hi - lo) * min(max(fraction, 0.0), 1.0), message)

    def log(self, message: str) -> None:
        if self.on_log is not None:
            self.on_log(message)

    def check(self) -> None:
        """Raise :class:`Cancelled` if the user asked to stop; called between tiles and stages."""
        if self.is_cancelled is not None and self.is_cancelled():
            raise Cancelled("cancelled by the user; nothing was written")
