"""What ChangeScribe's Processing algorithms share: the model and device parameters, the dependency check,
progress/cancel wiring and error translation.

Importing this module needs only QGIS and the standard library (the provider loads it at QGIS start-up);
torch, rasterio and geopandas are imported when an algorithm runs, through :func:`import_core`.
"""

from __future__ import annotations

import contextlib
import importlib
from pathlib import Path
from typing import Iterator

from qgis.core import (
    QgsCoordinateReferenceSystem,
    QgsProcessingAlgorithm,
    QgsProcessingException,
    QgsProcessingParameterDefinition,
    QgsProcessingParameterEnum,
    QgsProcessingParameterFile,
)
from qgis.PyQt.QtCore import QUrl
from qgis.PyQt.QtGui import QIcon

from .paths import ICON

MODEL, MODEL_FILE, DEVICE = "MODEL", "MODEL_FILE", "DEVICE"
OPTIONAL_MODELS = ("DETECTOR",)  # optional model choices that check_choices checks like MODEL
DEVICES = ["auto", "cpu", "cuda"]

INSTALL_HELP = (
    "Install the libraries into the Python that QGIS runs, then restart QGIS (README, 'Installing the plugin'). "
    "Linux (Debian/Ubuntu QGIS): sudo apt install python3-rasterio python3-geopandas python3-scipy, then "
    "python3 -m pip install --user torch==2.14.1 torchvision==0.29.1 safetensors tqdm. "
    "Windows: in the OSGeo4W Shell, python -m pip install torch torchvision safetensors tqdm. "
    "macOS: /Applications/QGIS.app/Contents/MacOS/bin/python3 -m pip install torch torchvision safetensors tqdm.")


class ChangeScribeAlgorithm(QgsProcessingAlgorithm):
    """What every ChangeScribe algorithm shares: its toolbox group, icon and how QGIS clones it."""

    def group(self) -> str:
        return "Change analysis"

    def groupId(self) -> str:  # noqa: N802 (QGIS's name)
        return "changeanalysis"

    def icon(self) -> QIcon:
        return QIcon(ICON)

    def createInstance(self) -> "ChangeScribeAlgorithm":  # noqa: N802
        return type(self)()

    def helpUrl(self) -> str:  # noqa: N802
        """The dialog's Help button opens the README shipped inside the plugin (offline) at *Using it*."""
        readme = Path(ICON).resolve().parents[2] / "README.md"
        return QUrl.fromLocalFile(str(readme)).toString() + "#using-it"

    def add_described(self, param: QgsProcessingParameterDefinition, help_text: str, advanced: bool = False) -> None:
        """Add a parameter with the help text QGIS shows for it; ``advanced`` tucks it under Advanced Parameters."""
        param.setHelp(help_text)
        if advanced:
            param.setFlags(param.flags() | QgsProcessingParameterDefinition.FlagAdvanced)
        self.addParameter(param)


def import_core(*modules: str) -> list:
    """Import ``changescribe.core.<module>`` for each name; a missing library becomes a clear
    :class:`QgsProcessingException` that says how to install it."""
    out = []
    for name in modules:
        try:
            out.append(importlib.import_module(f"..core.{name}", __package__))
        except ImportError as exc:
            missing = (exc.name or "").split(".")[0] or str(exc)
            raise QgsProcessingException(
                f"ChangeScribe cannot run because QGIS's Python cannot import {missing!r} ({exc}). "
                + INSTALL_HELP) from None
    return out


def model_names() -> list[str]:
    """Installed model names, the default first; reading the cards needs no torch."""
    from ..core.model_loading import DEFAULT_MODEL, installed_models

    try:
        names = [card["name"] for card in installed_models()]
    except Exception:  # noqa: BLE001 — an unreadable model folder must not break the toolbox
        names = []
    # The default is always offered: if it is missing, running says so clearly instead of the list being empty.
    return [DEFAULT_MODEL] + [n for n in names if n != DEFAULT_MODEL]


def model_enum(name: str, description: str, optional: bool = False) -> QgsProcessingParameterEnum:
    """A choice of installed model, stored by name (stable in models and batch files); the default model first,
    and the default value unless ``optional``."""
    names = model_names()
    param = QgsProcessingParameterEnum(name, description, options=names, optional=optional,
                                       defaultValue=None if optional else names[0])
    param.setUsesStaticStrings(True)  # the name, not a position, is stored
    return param


def add_model_parameters(alg: QgsProcessingAlgorithm) -> None:
    """MODEL (installed models, by name), MODEL_FILE (a card path that overrides MODEL) and DEVICE."""
    model = model_enum(MODEL, "Model")
    names = model.options()
    model.setHelp("An installed ChangeScribe model, by name (the shipped models and those in the folders of "
                  "CHANGESCRIBE_MODEL_PATH / the plugin settings). `changescribe models` lists them with their "
                  f"cards. The default is {names[0]}. With qgis_process give the name (MODEL={names[0]}) or the "
                  "option's number.")
    alg.addParameter(model)
    model_file = QgsProcessingParameterFile(
        MODEL_FILE, "Model file (overrides Model)", behavior=QgsProcessingParameterFile.File, optional=True,
        fileFilter="ChangeScribe model card (*.json);;ChangeScribe weights (*.safetensors)")
    model_file.setHelp("A ChangeScribe model file to use instead of the Model list: its JSON card or its "
                       ".safetensors weights (both must sit side by side). Pickled checkpoints (.pt, .pth, ...) "
                       "are refused.")
    alg.addParameter(model_file)
    device = QgsProcessingParameterEnum(DEVICE, "Device", options=DEVICES, defaultValue="auto")
    device.setUsesStaticStrings(True)
    device.setHelp("auto: a CUDA GPU when the installed PyTorch sees one, else the CPU. cuda fails (rather than "
                   "silently using the CPU) when no GPU is visible.")
    alg.addParameter(device)


def _option(alg: QgsProcessingAlgorithm, parameters: dict, name: str, context):
    """The option string an enum value names: the string itself, or an index (what 3.22's qgis_process help
    suggests: 'Number of selected option'). None when the value names no option."""
    definition = alg.parameterDefinition(name)
    options = definition.options()
    value = parameters.get(name)
    if value is None or value == "":
        return definition.defaultValue()
    if isinstance(value, str) and value in options:
        return value
    if isinstance(value, (int, str)) and not isinstance(value, bool):
        if str(value).strip().isdigit() and 0 <= int(value) < len(options):
            return options[int(value)]
        return None
    # Anything else (a QgsProperty from a data-defined batch cell, ...): let QGIS evaluate it.
    return alg.parameterAsEnumString(parameters, name, context) or None


def check_choices(alg: QgsProcessingAlgorithm, parameters: dict, context) -> tuple[bool, str, dict]:
    """Check MODEL, MODEL_FILE and DEVICE with messages that say what to do (instead of QGIS's 'Incorrect
    parameter value for MODEL'); returns the parameters with MODEL and DEVICE as option names, for QGIS's own
    checks of the rest."""
    from ..core.errors import ModelError
    from ..core.model_file import CARD_SUFFIX, PICKLE_SUFFIXES, WEIGHTS_SUFFIX, resolve_model

    normalised = dict(parameters)
    path = parameters.get(MODEL_FILE)
    if isinstance(path, str) and path:
        suffix = Path(path).suffix.lower()
        if suffix in PICKLE_SUFFIXES:
            try:
                resolve_model(path)  # refuses pickles with the explanation of why and what to do
            except ModelError as exc:
                return False, str(exc), normalised
        if suffix not in (CARD_SUFFIX, WEIGHTS_SUFFIX):
            return False, (f"MODEL_FILE must be a ChangeScribe model card ({CARD_SUFFIX}) or its weights "
                           f"({WEIGHTS_SUFFIX}): {path}"), normalised
    model = _option(alg, parameters, MODEL, context)
    if model is None and path:  # MODEL_FILE overrides MODEL: a stale name there does not matter
        model = alg.parameterDefinition(MODEL).defaultValue()
    if model is None:
        names = alg.parameterDefinition(MODEL).options()
        return False, (f"no installed model is named {parameters.get(MODEL)!r}; installed: {', '.join(names)}. "
                       "Give the path of a model card as MODEL_FILE to use another model."), normalised
    device = _option(alg, parameters, DEVICE, context)
    if device is None:
        return False, f"DEVICE must be one of {', '.join(DEVICES)}, not {parameters.get(DEVICE)!r}", normalised
    for name in (n for n in OPTIONAL_MODELS if alg.parameterDefinition(n) is not None):
        if parameters.get(name) not in (None, "") and _option(alg, parameters, name, context) is None:
            names = alg.parameterDefinition(name).options()
            return False, (f"no installed model is named {parameters.get(name)!r} ({name}); installed: "
                           f"{', '.join(names)}"), normalised
    normalised[MODEL], normalised[DEVICE] = model, device
    return True, "", normalised


def model_choice(alg: QgsProcessingAlgorithm, parameters: dict, context) -> str:
    """MODEL_FILE if given, else the MODEL name (what core.model_loading.load_model takes)."""
    path = alg.parameterAsFile(parameters, MODEL_FILE, context)
    if path:
        return path
    return _option(alg, parameters, MODEL, context) or "default"


def device_choice(alg: QgsProcessingAlgorithm, parameters: dict, context) -> str:
    return _option(alg, parameters, DEVICE, context) or "auto"


def option_choice(alg: QgsProcessingAlgorithm, parameters: dict, name: str, context) -> str | None:
    """The option an optional enum (e.g. DETECTOR) names, or None when it is not set."""
    return _option(alg, parameters, name, context) or None


def raster_input(alg: QgsProcessingAlgorithm, parameters: dict, name: str, context, role: str):
    """The raster layer of parameter ``name``, or a QgsProcessingException that names the file."""
    layer = alg.parameterAsRasterLayer(parameters, name, context)
    if layer is None or not layer.isValid():
        value = parameters.get(name)
        what = f"{value!r} is not a raster GDAL can read" if value else "none was given"
        raise QgsProcessingException(f"the {role} raster cannot be opened: {what}")
    return layer


def run_control(feedback, run_control_cls):
    """A core RunControl reporting into ``feedback`` and polling its cancel flag."""
    last = [""]

    def progress(fraction: float, message: str) -> None:
        feedback.setProgress(100.0 * fraction)
        if message and message != last[0]:
            last[0] = message
            feedback.setProgressText(message)

    return run_control_cls(on_progress=progress, is_cancelled=feedback.isCanceled, on_log=feedback.pushInfo)


@contextlib.contextmanager
def processing_errors() -> Iterator[None]:
    """ChangeScribe's one-line errors (and a cancel) become QgsProcessingException, without a traceback."""
    from ..core.errors import Cancelled, ChangeScribeError

    try:
        yield
    except Cancelled as exc:
        raise QgsProcessingException(str(exc) or "cancelled") from None
    except ChangeScribeError as exc:
        raise QgsProcessingException(str(exc)) from None
    except QgsProcessingException:
        raise
    except Exception as exc:  # noqa: BLE001 (qgis_process would print a raw traceback: one line instead)
        import traceback

        from qgis.core import Qgis, QgsMessageLog

        QgsMessageLog.logMessage(traceback.format_exc(), "ChangeScribe", Qgis.MessageLevel.Critical)
        raise QgsProcessingException(f"unexpected {type(exc).__name__}: {' '.join(str(exc).split())} "
                                     "(details in the Log Messages panel, ChangeScribe tab)") from None


def crs_string(crs: QgsCoordinateReferenceSystem) -> str:
    """What rasterio/pyproj accept: the authority id, or the full WKT for a CRS without one."""
    return crs.authid() or crs.toWkt(QgsCoordinateReferenceSystem.WKT_PREFERRED)
