"""The dock's remembered choices, in QgsSettings under ``changescribe/`` (per QGIS profile).

One typed accessor per key, so a misspelt key or a string-vs-number mix-up cannot creep in across modules.
"""

from __future__ import annotations

import os
from pathlib import Path

from qgis.core import QgsApplication, QgsProject, QgsSettings

from ..core.model_loading import MODEL_PATH_ENV
from .paths import PLUGIN_DIR

PREFIX = "changescribe/"
EXECUTION_MODES = ("auto", "qgis", "worker")  # auto: QGIS's Python when torch is there, else the worker
DEFAULTS: dict[str, object] = {
    "model": "", "device": "auto", "threshold": 0.5, "min_area": 0.0, "tile_size": 0, "overlap": -1,
    "batch_size": 8, "model_gsd": False, "probability_layer": False, "aoi_mode": 0,
    "output_folder": "", "model_folder": "", "execution": "auto", "python": "", "env_folder": "",
    "base_python": "", "captions": True, "fill_nodata": True, "onnxruntime": True, "beam_size": 0, "detector": "",
}


class Settings:
    """Typed get/set over QgsSettings; values missing or of the wrong type fall back to :data:`DEFAULTS`."""

    def __init__(self) -> None:
        self._s = QgsSettings()

    def get(self, key: str):
        default = DEFAULTS[key]
        raw = self._s.value(PREFIX + key, default)
        try:
            if isinstance(default, bool):
                return raw if isinstance(raw, bool) else str(raw).lower() in ("1", "true", "yes")
            if isinstance(default, int):
                return int(raw)
            if isinstance(default, float):
                return float(raw)
        except (TypeError, ValueError):
            return default
        return "" if raw is None else str(raw)

    def set(self, key: str, value) -> None:
        if key not in DEFAULTS:
            raise KeyError(key)
        self._s.setValue(PREFIX + key, value)

    def output_folder(self) -> Path:
        """The chosen folder, else ``ChangeScribe`` beside the saved project, else in the QGIS profile.

        Never the plugin folder: it is replaced on every plugin update, and results would vanish with it.
        """
        chosen = self.get("output_folder")
        if chosen and not _inside(Path(chosen), PLUGIN_DIR):
            return Path(chosen)
        return default_output_folder()

    def model_dirs(self) -> list[str]:
        folder = self.get("model_folder")
        return [folder] if folder and Path(folder).is_dir() else []

    def execution(self) -> str:
        mode = self.get("execution")
        return mode if mode in EXECUTION_MODES else "auto"

    def env_folder(self) -> Path:
        folder = self.get("env_folder")
        return Path(folder) if folder else Path(QgsApplication.qgisSettingsDirPath()) / "changescribe" / "python-env"


_exported: list[str] = []  # the model folder this module added to the environment, to replace it later


def export_model_folder() -> None:
    """Put the Settings model folder on CHANGESCRIBE_MODEL_PATH, so the Processing algorithms list its models too."""
    folder = Settings().get("model_folder")
    parts = [p for p in os.environ.get(MODEL_PATH_ENV, "").split(os.pathsep) if p and p not in _exported]
    _exported.clear()
    if folder and folder not in parts:
        parts.append(folder)
        _exported.append(folder)
    if parts:
        os.environ[MODEL_PATH_ENV] = os.pathsep.join(parts)
    else:
        os.environ.pop(MODEL_PATH_ENV, None)


def default_output_folder() -> Path:
    home = QgsProject.instance().homePath()
    if home:
        return Path(home) / "ChangeScribe"
    return Path(QgsApplication.qgisSettingsDirPath()) / "ChangeScribe"


def _inside(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
    except ValueError:
        return False
    return True
