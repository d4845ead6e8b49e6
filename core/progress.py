"""One progress figure for a run of several stages, each counted in its own units, that tells the time left.

A run is tiles (inference), then strips (regions), then regions captioned. Their costs differ by machine, model and
scene, so a fixed split of the bar (say 75 % for the tiles) lies: after the last tile it may sit still for most of
the run. Here each stage has a unit count and a cost per unit: measured while the stage runs, estimated before
(the estimates are refined as earlier stages teach the speed of this machine). The overall fraction is
``elapsed / (elapsed + estimated time left over all stages)``, never decreasing, so a consumer that extrapolates
the time left from the fraction (the dock, tqdm) gets the estimate of every stage, not of the tiles alone.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

from .run_control import RunControl


@dataclass
class Stage:
    """One stage: ``units`` to do, ``seconds_per_unit`` estimated until measured, ``done`` so far."""

    name: str
    units: float
    seconds_per_unit: float
    done: float = 0.0
    started: float | None = None
    ended: float | None = None
    finished: bool = False

    def seconds_left(self, now: float) -> float:
        left = max(0.0, self.units - self.done)
        if self.started is not None and self.done > 0 and now > self.started:
            measured = (now - self.started) / self.done
            # trust the measurement more as more of the stage is done
            weight = min(1.0, self.done / max(1.0, 0.1 * self.units))
            return left * (weight * measured + (1 - weight) * self.seconds_per_unit)
        return left * self.seconds_per_unit


class RunProgress:
    """Stages in order; :meth:`control` gives each stage a :class:`RunControl` whose 0..1 is that stage's."""

    def __init__(self, control: RunControl, clock: Callable[[], float] = time.monotonic):
        self.parent, self.clock = control, clock
        self.started = clock()
        self.stages: dict[str, Stage] = {}
        self.fraction = 0.0

    def plan(self, name: str, units: float, seconds_per_unit: float) -> None:
        """Add a stage (in run order) or update its unit count and cost estimate."""
        stage = self.stages.get(name)
        if stage is None:
            self.stages[name] = Stage(name, float(units), float(seconds_per_unit))
        else:
            stage.units, stage.seconds_per_unit = float(units), float(seconds_per_unit)

    def rate(self, name: str) -> float | None:
        """Measured seconds per unit of a stage that has run, else None."""
        stage = self.stages.get(name)
        if stage is None or stage.started is None or stage.done <= 0:
            return None
        return ((stage.ended if stage.ended is not None else self.clock()) - stage.started) / stage.done

    def control(self, name: str) -> RunControl:
        """The control a stage reports to: its fraction is of its own units, its message says which unit."""
        return RunControl(on_progress=lambda f, m: self.update(name, f, m), is_cancelled=self.parent.is_cancelled,
                          on_log=self.parent.on_log)

    def update(self, name: str, fraction: float, message: str = "") -> None:
        now = self.clock()
        stage = self.stages[name]
        if stage.started is None:
            self.begin(name)
        stage.done = min(max(fraction, 0.0), 1.0) * stage.units
        self.report(message)

    def begin(self, name: str) -> None:
        """The stage starts now (its first unit may take a while to report); the stages before it are over."""
        for stage in self.stages.values():
            if stage.name == name:
                break
            if not stage.finished:
                self.finish(stage.name)
        self.stages[name].started = self.clock()

    def finish(self, name: str) -> None:
        """The stage is over: its measured cost becomes its estimate (later stages may derive theirs from it)."""
        stage = self.stages[name]
        now = self.clock()
        if stage.started is not None and stage.done > 0:
            stage.seconds_per_unit = (now - stage.started) / stage.done
            stage.ended = now
        stage.done, stage.finished = stage.units, True

    def report(self, message: str) -> None:
        now = self.clock()
        elapsed = now - self.started
        left = sum(s.seconds_left(now) for s in self.stages.values() if not s.finished)
        total = elapsed + left
        fraction = elapsed / total if total > 0 else 0.0
        self.fraction = max(self.fraction, min(fraction, 0.999))
        self.parent.progress(self.fraction, message)

    def done(self, message: str = "done") -> None:
        self.fraction = 1.0
        self.parent.progress(1.0, message)
