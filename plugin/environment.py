"""Where ChangeScribe can run: QGIS's own Python, or a separate Python environment (the worker).

Also creates that environment on request (``python -m venv`` + ``pip install -r requirements.txt``, the
repository's pinned PyTorch) as a QgsTask, and reports the exact commands and paths, so users can repeat or
repair it by hand. Nothing here imports torch: probing QGIS's Python does, but only inside a task.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qgis.core import QgsTask
from qgis.PyQt.QtCore import pyqtSignal

from ..core.worker import REQUIRED_MODULES, one_line
from .paths import PLUGIN_DIR

# Used only when the plugin was installed without requirements.txt (the zip); tests keep it equal to the file.
FALLBACK_REQUIREMENTS = ["torch==2.14.1", "torchvision==0.29.1", "safetensors>=0.4", "tqdm>=4.64",
                         "dask[distributed]>=2024.1", "onnx>=1.16", "onnxruntime>=1.18"]
GEOSPATIAL = ("numpy", "rasterio", "geopandas", "shapely", "pyproj", "scipy")


def qgis_python_missing() -> list[str]:
    """Modules QGIS's Python lacks, found without importing them (torch's import is slow and may crash)."""
    return [m for m in REQUIRED_MODULES if importlib.util.find_spec(m) is None]


def missing_message(missing: list[str]) -> str:
    """The line the dock shows when QGIS's Python cannot run the pipeline."""
    if "torch" in missing:
        return ("PyTorch is not installed in QGIS's Python. Install it (see the README), or run ChangeScribe in "
                "a separate Python environment: Settings → Separate Python environment (pick a Python with "
                "PyTorch, or let ChangeScribe create one).")
    return (f"QGIS's Python lacks {', '.join(missing)}. Install them (see the README), or run ChangeScribe in a "
            "separate Python environment: Settings → Separate Python environment.")


def venv_python(env_dir: Path) -> Path:
    return env_dir / ("Scripts/python.exe" if sys.platform == "win32" else "bin/python")


def default_base_python() -> str:
    """A real Python interpreter to build the environment from (inside QGIS, sys.executable is QGIS itself)."""
    prefix = Path(sys.exec_prefix)
    for cand in (prefix / "bin" / "python3", prefix / "python3.exe", prefix / "python.exe"):
        if cand.is_file():
            return str(cand)
    return shutil.which("python3") or shutil.which("python") or "python3"


def requirements_file() -> Path | None:
    path = PLUGIN_DIR / "requirements.txt"
    return path if path.is_file() else None


def requirement_lines(path: Path | None) -> list[str]:
    if path is None:
        return list(FALLBACK_REQUIREMENTS)
    return [ln.split("#")[0].strip() for ln in path.read_text().splitlines() if ln.split("#")[0].strip()]


@dataclass
class EnvironmentPlan:
    """The commands that make a worker environment, decided before anything runs so they can be shown."""

    base_python: str
    env_dir: Path
    requirements: Path | None
    constraints: Path | None
    commands: list[list[str]] = field(default_factory=list)

    @property
    def python(self) -> Path:
        return venv_python(self.env_dir)


def plan_environment(base_python: str, env_dir: Path, requirements: Path | None | str = "default",
                     constraints: Path | None | str = "default") -> EnvironmentPlan:
    """``--system-site-packages`` lets the environment use the system's GDAL/rasterio/geopandas (pip's
    rasterio wheels bring another GDAL); ``constraints.txt`` keeps pip from replacing them."""
    req = requirements_file() if requirements == "default" else requirements
    con = (PLUGIN_DIR / "constraints.txt") if constraints == "default" else constraints
    con = con if con is not None and Path(con).is_file() else None
    plan = EnvironmentPlan(base_python, Path(env_dir), Path(req) if req else None, con)
    plan.commands.append([base_python, "-m", "venv", "--system-site-packages", str(plan.env_dir)])
    pip = [str(plan.python), "-m", "pip", "install", "--disable-pip-version-check"]
    if con is not None:
        pip += ["-c", str(con)]
    if plan.requirements is not None:
        pip += ["-r", str(plan.requirements)]
    elif requirements == "default":
        pip += requirement_lines(None)
    else:
        pip = []  # an explicit None: no packages (tests, or a Python that already has them)
    if pip:
        plan.commands.append(pip)
    return plan


def shell_line(cmd: list[str]) -> str:
    return " ".join(f'"{c}"' if (" " in c or not c) else c for c in cmd)


class ProbeTask(QgsTask):
    """Asks a Python what it can run (PyTorch version, CUDA and the GPU's name) without blocking QGIS."""

    done = pyqtSignal(object)  # the probe dict, with "error" set when the Python could not answer

    def __init__(self, python: str | None):
        # Hidden (QGIS ≥ 3.26) keeps this quick check out of the task manager
        super().__init__("ChangeScribe: checking PyTorch", getattr(QgsTask.Flag, "Hidden", QgsTask.Flag.CanCancel))
        self.python = python
        self.info: dict[str, Any] = {}

    def run(self) -> bool:  # noqa: D102
        try:
            if self.python:
                from .worker_client import probe_python

                self.info = probe_python(self.python)
            else:
                from ..core.worker import probe

                self.info = probe()
        except Exception as exc:  # noqa: BLE001 (reported in the dock)
            self.info = {"error": one_line(str(exc)), "devices": {}, "missing": []}
        return True

    def finished(self, ok: bool) -> None:  # noqa: D102
        self.done.emit(self.info)


class CreateEnvironmentTask(QgsTask):
    """Runs an :class:`EnvironmentPlan`, streaming pip's output to the log; ``report`` says what was done."""

    line = pyqtSignal(str)
    done = pyqtSignal(object)  # (ok: bool, report: str, python: str)

    def __init__(self, plan: EnvironmentPlan, plugin_parent: str | None = None):
        super().__init__("ChangeScribe: creating a Python environment", QgsTask.Flag.CanCancel)
        self.plan = plan
        self.plugin_parent = plugin_parent
        self.ok = False
        self.report = ""

    def run(self) -> bool:  # noqa: D102
        done_cmds: list[str] = []
        try:
            for i, cmd in enumerate(self.plan.commands):
                self.line.emit("$ " + shell_line(cmd))
                rc, tail = self._run(cmd, i)
                done_cmds.append(shell_line(cmd))
                if self.isCanceled():
                    self.report = self._describe(done_cmds, "cancelled")
                    return False
                if rc != 0:
                    self.report = self._describe(done_cmds, f"the last command failed (exit code {rc}): {tail}")
                    return False
            from .worker_client import PLUGIN_PARENT, probe_python

            info = probe_python(str(self.plan.python), self.plugin_parent or PLUGIN_PARENT)
            missing = info.get("missing") or []
            state = "ready" if not missing else (
                f"created, but it lacks {', '.join(missing)}; add them with: "
                f"{shell_line([str(self.plan.python), '-m', 'pip', 'install', *missing])}")
            self.ok = not missing
            self.report = self._describe(done_cmds, state, info)
            return True
        except Exception as exc:  # noqa: BLE001
            self.report = self._describe(done_cmds, f"failed: {one_line(str(exc))}")
            return False

    def _run(self, cmd: list[str], index: int) -> tuple[int, str]:
        flags = getattr(subprocess, "CREATE_NO_WINDOW", 0) if sys.platform == "win32" else 0
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
                                env=env, creationflags=flags)
        tail = ""
        n = len(self.plan.commands)
        for raw in proc.stdout:
            text = raw.rstrip()
            if text:
                tail = text
                self.line.emit(text)
            self.setProgress(100.0 * (index + 0.5) / n)
            if self.isCanceled():
                proc.terminate()
                break
        rc = proc.wait()
        self.setProgress(100.0 * (index + 1) / n)
        return rc, one_line(tail)

    def _describe(self, cmds: list[str], state: str, info: dict | None = None) -> str:
        lines = [f"Python environment {self.plan.env_dir}: {state}.", "Commands run:"] + [f"  {c}" for c in cmds]
        lines.append(f"Worker Python: {self.plan.python}")
        if info and info.get("torch"):
            lines.append(f"PyTorch {info['torch']}, runs on: {info.get('devices', {}).get('auto', '?')}")
        return "\n".join(lines)

    def finished(self, ok: bool) -> None:  # noqa: D102
        self.done.emit((self.ok, self.report, str(self.plan.python)))

