"""ChangeScribe's library: two rasters in, change regions with captions out (no QGIS, no Qt).

The public surface is :data:`__all__`. The run contract (:class:`DetectRequest`, :class:`DetectResult`) and the
errors import with the standard library only; the rest (torch, rasterio) is imported on first use, so
``from changescribe.core import DetectRequest`` works in a Python without PyTorch (the plugin in QGIS).
"""

from __future__ import annotations

import importlib
from typing import Any

from .api import Area, DetectRequest, DetectResult
from .errors import (
    Cancelled,
    ChangeScribeError,
    DependencyError,
    InputError,
    ModelError,
    OutOfDeviceMemory,
    StaleProbabilityError,
)

# name -> the module that defines it, imported when the name is first used
_LAZY = {
    "run_request": ".run", "detect": ".pipeline", "detect_changes": ".pipeline", "ChangeResult": ".pipeline",
    "RunControl": ".run_control", "ChangeModel": ".model_api", "InputSpec": ".model_api",
    "load_model": ".model_loading", "installed_models": ".model_loading", "AreaOfInterest": ".raster_pair",
}

__all__ = ["Area", "DetectRequest", "DetectResult", "Cancelled", "ChangeScribeError", "DependencyError",
           "InputError", "ModelError", "OutOfDeviceMemory", "StaleProbabilityError", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
