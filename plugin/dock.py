"""The ChangeScribe dock: pick two rasters, run in the background, see change polygons and captions.

Widgets only: the panels live in ``dock_widgets_*``, the run in :mod:`.run_task` (a QgsTask, in QGIS's Python or
through :mod:`.worker_client`), and everything that computes in ``core/``. This module wires them together
and decides, on the main thread, what a run needs (sources, job, cache, output names).
"""

from __future__ import annotations

import re
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from qgis.core import Qgis, QgsApplication, QgsMessageLog, QgsProject
from qgis.gui import QgsCollapsibleGroupBox, QgsDockWidget
from qgis.PyQt.QtWidgets import (
    QComboBox,
    QFrame,
    QHBoxLayout,
    QLabel,
    QPlainTextEdit,
    QProgressBar,
    QPushButton,
    QScrollArea,
    QVBoxLayout,
    QWidget,
)

from ..core.api import DetectRequest
from ..core.errors import InputError
from .dock_widgets_annotate import AnnotatePanel
from .dock_widgets_import import ImportDialog, ImportTask, default_model_folder
from .dock_widgets_inputs import PairPicker, gdal_source, project_rasters
from .dock_widgets_model import PANEL_FIELDS, ModelPanel
from .dock_widgets_results import GROUP_NAME, ResultsPanel, add_result_layers
from .dock_widgets_settings import SettingsDialog
from .environment import CreateEnvironmentTask, EnvironmentPlan, ProbeTask, missing_message, qgis_python_missing
from .run_task import LOG_TAG, ChangeTask, RunJob, RunOutcome
from .settings import Settings, export_model_folder

ERROR_STYLE = "color: #b3140b;"
# The DetectRequest fields the dock sets besides the model panel's (PANEL_FIELDS), and those it leaves alone:
# re-use comes from the cache in cache_dir, and every run writes new files, so nothing is overwritten.
DOCK_FIELDS = PANEL_FIELDS + ("before", "after", "output", "area_of_interest", "cache_dir", "probability_output")
DOCK_UNSET = ("reuse_probability", "overwrite")


def dock_request(panel: ModelPanel, before: str, after: str, output: Path, aoi: dict | None) -> DetectRequest:
    """The run the dock's widgets choose, writing ``output`` (its probability map beside it when asked for) and
    keeping the probability cache in the output folder's ``cache``; :class:`InputError` when out of range."""
    prob = output.with_name(output.stem + "_probability.tif") if panel.probability_check.isChecked() else None
    return DetectRequest(before=before, after=after, output=str(output), area_of_interest=aoi,
                         cache_dir=str(output.parent / "cache"), probability_output=str(prob) if prob else None,
                         **panel.request_options())


def eta_text(elapsed: float, fraction: float) -> str:
    """'about 40 s left' once there is enough progress to extrapolate from."""
    if fraction < 0.02 or elapsed < 1.5 or fraction >= 1.0:
        return ""
    left = elapsed * (1.0 - fraction) / fraction
    if left < 60:
        return f"about {max(1, round(left))} s left"
    return f"about {round(left / 60)} min left"


def plural(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")[:40] or "raster"


class ChangeScribeDock(QgsDockWidget):
    """The dock; :attr:`task` is the running :class:`ChangeTask` (None when idle)."""

    def __init__(self, iface, parent: QWidget | None = None):
        super().__init__("ChangeScribe", parent)
        self.setObjectName("ChangeScribeDock")
        self.iface = iface
        self.settings = Settings()
        self.task: ChangeTask | None = None
        self.last_outcome: RunOutcome | None = None
        self.last_layer = None
        self.runs = 0
        self._probe: ProbeTask | None = None
        self._env_task: CreateEnvironmentTask | None = None
        self._python: str | None = None  # None: QGIS's Python
        self._import_task: ImportTask | None = None  # the model picker's "Import checkpoint…", while it runs
        self._runnable = False
        self._started = 0.0
        self._build()
        self.model_panel.load(self.settings)
        self.pair.set_fill_nodata(self.model_panel.fill_check.isChecked())
        self.pair.aoi_combo.setCurrentIndex(self.settings.get("aoi_mode"))
        self._refresh_models()
        project = QgsProject.instance()
        project.layersAdded.connect(self._layers_changed)
        project.layersRemoved.connect(self._layers_changed)
        self._layers_changed()
        self.check_environment()

    # ---- layout -------------------------------------------------------------------------------------------
    def _build(self) -> None:
        self.pair = PairPicker()
        self.model_panel = ModelPanel()
        self.results = ResultsPanel(self.iface.mapCanvas())
        self.run_button = QPushButton("Run")
        self.run_button.setObjectName("changescribe_run")
        self.run_button.setDefault(True)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setObjectName("changescribe_cancel")
        self.cancel_button.setEnabled(False)
        self.settings_button = QPushButton("Settings…")
        self.progress_bar = QProgressBar()
        self.progress_bar.setRange(0, 100)
        self.progress_bar.setValue(0)
        self.status_label = _label("changescribe_status")
        self.device_label = _label("changescribe_device_label")
        self.env_label = _label("changescribe_environment")
        self.env_settings_button = QPushButton("Use a separate Python…")
        self.env_create_button = QPushButton("Create one…")
        self.log_edit = QPlainTextEdit()
        self.log_edit.setReadOnly(True)
        self.log_edit.setMaximumBlockCount(2000)
        self.log_edit.setMinimumHeight(90)

        env_row = QHBoxLayout()
        env_row.addWidget(self.env_settings_button)
        env_row.addWidget(self.env_create_button)
        env_row.addStretch(1)
        self.env_box = QFrame()
        self.env_box.setFrameShape(QFrame.Shape.StyledPanel)
        env_layout = QVBoxLayout(self.env_box)
        env_layout.addWidget(self.env_label)
        env_layout.addLayout(env_row)
        run_row = QHBoxLayout()
        run_row.addWidget(self.run_button)
        run_row.addWidget(self.cancel_button)
        run_row.addStretch(1)
        run_row.addWidget(self.settings_button)
        self.annotate = AnnotatePanel(self.iface.mapCanvas(),
                                      lambda: (self.pair.before_layer(), self.pair.after_layer()),
                                      self.model_panel.current_card,
                                      lambda: [self.last_layer] if self.last_layer is not None else [],
                                      python=lambda: self._python)
        self.annotate_box = QgsCollapsibleGroupBox("Annotate")
        self.annotate_box.setObjectName("changescribe_annotate")
        self.annotate_box.setCollapsed(True)
        QVBoxLayout(self.annotate_box).addWidget(self.annotate)
        log_box = QgsCollapsibleGroupBox("Log")
        log_box.setCollapsed(True)
        QVBoxLayout(log_box).addWidget(self.log_edit)

        inner = QWidget()
        box = QVBoxLayout(inner)
        box.addWidget(_section("Rasters"))
        box.addWidget(self.pair)
        box.addWidget(_section("Model"))
        box.addWidget(self.model_panel)
        box.addWidget(self.env_box)
        box.addLayout(run_row)
        box.addWidget(self.progress_bar)
        box.addWidget(self.status_label)
        box.addWidget(self.device_label)
        box.addWidget(_section("Result"))
        box.addWidget(self.results, 1)
        box.addWidget(self.annotate_box)
        box.addWidget(log_box)
        fit_dock_width(inner)
        scroll = QScrollArea()
        scroll.setWidgetResizable(True)
        scroll.setFrameShape(QFrame.Shape.NoFrame)
        scroll.setWidget(inner)
        self.setWidget(scroll)
        self.results.table.setMinimumHeight(220)

        self.run_button.clicked.connect(self.start_run)
        self.cancel_button.clicked.connect(self.cancel_run)
        self.settings_button.clicked.connect(self.open_settings)
        self.env_settings_button.clicked.connect(self.open_settings)
        self.env_create_button.clicked.connect(self.open_settings)
        self.pair.changed.connect(self._update_run_button)
        self.model_panel.device_combo.currentIndexChanged.connect(self._show_device)
        self.model_panel.fill_check.toggled.connect(self.pair.set_fill_nodata)
        self.model_panel.import_requested.connect(self.import_checkpoint)

    # ---- environment ----------------------------------------------------------------------------------------
    def check_environment(self) -> None:
        """Decide where runs go (QGIS's Python or the worker), say so, and probe that Python's devices."""
        mode, python = self.settings.execution(), self.settings.get("python")
        missing = qgis_python_missing()
        problem = None
        if mode == "worker" or (mode == "auto" and missing and python):
            if not python or not Path(python).is_file():
                problem = "Choose the separate Python environment's python executable in Settings."
            self._python = python or None
        else:
            self._python = None
            if missing:
                problem = missing_message(missing)
        self._runnable = problem is None
        self.env_box.setVisible(problem is not None)
        self.env_label.setText(problem or "")
        where = f"the separate Python {self._python}" if self._python else "QGIS's Python"
        self.device_label.setText(f"Runs in {where}." if self._runnable else "")
        self._update_run_button()
        if self._runnable:
            self._probe = ProbeTask(self._python)
            self._probe.done.connect(self._probed)
            QgsApplication.taskManager().addTask(self._probe)

    def _probed(self, info: dict[str, Any]) -> None:
        self._probe = None
        self.probe_info = info
        if info.get("error") or info.get("torch_error"):
            self._runnable = False
            self.env_box.setVisible(True)
            self.env_label.setText(f"PyTorch cannot be used: {info.get('error') or info.get('torch_error')}")
            self._update_run_button()
            return
        self.model_panel.set_probe(info)
        self._show_device()

    def _show_device(self, *_args) -> None:
        info = getattr(self, "probe_info", None) or {}
        if self.task is not None or not self._runnable:
            return
        where = f"the separate Python {self._python}" if self._python else "QGIS's Python"
        device = (info.get("devices") or {}).get(self.model_panel.device())
        if device is None and info and self.model_panel.device() == "cuda":
            device = "no CUDA GPU visible to PyTorch: choose Auto or CPU"
        self.device_label.setText(f"Runs in {where} on: {device or 'checking…'}")

    def open_settings(self) -> None:
        dialog = SettingsDialog(self.settings, self.create_environment, self)
        if dialog.exec():
            export_model_folder()
            self._refresh_models()
            self.check_environment()

    def create_environment(self, plan: EnvironmentPlan) -> None:
        self._log(f"Creating a Python environment in {plan.env_dir}")
        self._env_task = CreateEnvironmentTask(plan)
        self._env_task.line.connect(self._log)
        self._env_task.done.connect(self._environment_created)
        self.status_label.setText("Creating the Python environment (see the task manager and the log)…")
        QgsApplication.taskManager().addTask(self._env_task)

    def _environment_created(self, done: tuple[bool, str, str]) -> None:
        ok, report, python = done
        self._env_task = None
        self._log(report)
        QgsMessageLog.logMessage(report, LOG_TAG, Qgis.MessageLevel.Info if ok else Qgis.MessageLevel.Warning)
        if ok:
            self.settings.set("python", python)
        self.status_label.setText(report.splitlines()[0])
        self.iface.messageBar().pushMessage("ChangeScribe", report.splitlines()[0] + " Details: the dock's log.",
                                            Qgis.MessageLevel.Success if ok else Qgis.MessageLevel.Warning, 15)
        self.check_environment()

    # ---- inputs ---------------------------------------------------------------------------------------------
    def _layers_changed(self, *_args) -> None:
        self.pair.guess(project_rasters())

    def import_checkpoint(self) -> ImportTask | None:
        """The model picker's *Import checkpoint…*: ask, then import in the Python that runs the pipeline. The new
        model's folder becomes the Settings model folder (when none was set), so the picker lists it."""
        folder = self.settings.get("model_folder") or str(default_model_folder())
        dialog = ImportDialog(folder, self)
        if not dialog.exec():
            return None
        job = dialog.job()
        if not job["checkpoint"] or not job["folder"]:
            self.show_error("choose a checkpoint file and a model folder")
            return None
        self._log(f"Importing {job['checkpoint']} ({job['family']}, {job['dataset']}) into {job['folder']}")
        self.status_label.setText("Importing the checkpoint…")
        task = ImportTask(job, self._python)
        task.done.connect(lambda outcome: self._imported(outcome, job))
        self._import_task = task  # keep a reference while it runs
        QgsApplication.taskManager().addTask(task)
        return task

    def _imported(self, outcome: tuple[bool, str], job: dict[str, Any]) -> None:
        ok, text = outcome
        self._import_task = None
        if not ok:
            self.show_error(text)
            return
        if Path(job["folder"]).resolve() not in [Path(d).resolve() for d in self.settings.model_dirs()]:
            if not self.settings.get("model_folder"):
                self.settings.set("model_folder", job["folder"])
                export_model_folder()
            else:
                self._log(f"{job['folder']} is not the model folder in Settings; the picker lists the new model "
                          "only while the model folder is set to it")
        self.model_panel.refresh_models(self.settings.model_dirs() + [job["folder"]], text)
        message = f"Imported {Path(text).stem}: {text}"
        self._log(message)
        self.status_label.setStyleSheet("")
        self.status_label.setText(message)
        self.iface.messageBar().pushMessage("ChangeScribe", message, Qgis.MessageLevel.Success, 10)
        self._update_run_button()

    def _refresh_models(self) -> None:
        error = self.model_panel.refresh_models(self.settings.model_dirs(), self.settings.get("model"))
        if error:
            self._log(error)
        self._update_run_button()

    def _update_run_button(self) -> None:
        ok, _ = self.pair.alignment()
        self.run_button.setEnabled(self.task is None and self._runnable and ok
                                   and self.model_panel.current_card() is not None)

    # ---- running ---------------------------------------------------------------------------------------------
    def build_request(self) -> RunJob:
        """Everything the task needs, from the widgets; ValueError with a user-facing message when not ready."""
        before, after = self.pair.before_layer(), self.pair.after_layer()
        ok, text = self.pair.alignment()
        if not ok:
            raise ValueError(text)
        card = self.model_panel.current_card()
        if card is None:
            raise ValueError("no model: put a ChangeScribe model file in the model folder (Settings)")
        aoi = self.pair.area_of_interest(self.iface.mapCanvas())
        out_dir = self.settings.output_folder()
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ValueError(f"cannot create the output folder {out_dir}: {exc.strerror}") from None
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        base = f"changes_{safe_name(before.name())}_{safe_name(after.name())}_{stamp}"
        output = out_dir / f"{base}.gpkg"
        n = 1
        while output.exists():
            n += 1
            output = out_dir / f"{base}_{n}.gpkg"
        try:
            request = dock_request(self.model_panel, gdal_source(before), gdal_source(after), output, aoi)
        except InputError as exc:
            raise ValueError(str(exc)) from None
        return RunJob(request=request, python=self._python, title=f"ChangeScribe: {before.name()} → {after.name()}")

    def processing_parameters(self) -> dict[str, Any]:
        """The dock's current choices as ``changescribe:detectchanges`` parameters (the Processing dialog opened
        from the menu starts from them); a pair that is not two different layers is left out."""
        params: dict[str, Any] = {}
        before, after = self.pair.before_layer(), self.pair.after_layer()
        if before is not None and after is not None and before.id() != after.id():
            params.update(BEFORE=before, AFTER=after)
        card = self.model_panel.current_card()
        if card is not None:
            params["MODEL_FILE"] = card["path"]
        params.update(THRESHOLD=self.model_panel.threshold_spin.value(),
                      MIN_AREA=self.model_panel.min_area_spin.value())
        return params

    def start_run(self) -> bool:
        if self.task is not None:
            return False
        try:
            request = self.build_request()
        except ValueError as exc:
            self.show_error(str(exc))
            return False
        self.model_panel.save(self.settings)
        self.settings.set("aoi_mode", self.pair.aoi_combo.currentIndex())
        self.runs += 1
        self._layer_name = (f"Changes {self.pair.before_layer().name()} → {self.pair.after_layer().name()} "
                            f"{datetime.now():%H:%M:%S}")
        r = request.request
        self._log(f"Run {self.runs}: {r.before} → {r.after}; model {Path(r.model).stem}; "
                  f"threshold {r.threshold:g}, minimum area {r.min_area:g} m²; output {r.output}")
        self.task = ChangeTask(request)
        self.task.message.connect(self._on_event)
        self.task.done.connect(self._on_done)
        self._started = time.monotonic()
        self.progress_bar.setValue(0)
        self.status_label.setStyleSheet("")
        self.status_label.setText("Starting…")
        self.run_button.setEnabled(False)
        self.cancel_button.setEnabled(True)
        QgsApplication.taskManager().addTask(self.task)
        return True

    def cancel_run(self) -> None:
        if self.task is not None:
            self.status_label.setText("Cancelling…")
            self.cancel_button.setEnabled(False)
            self.task.cancel()

    def _on_event(self, event: dict[str, Any]) -> None:
        kind = event.get("event")
        if kind == "progress":
            fraction = float(event.get("fraction", 0.0))
            self.progress_bar.setValue(int(round(100 * fraction)))
            eta = eta_text(time.monotonic() - self._started, fraction)
            self.status_label.setText(" — ".join(t for t in (event.get("message", ""), eta) if t))
        elif kind == "device":
            where = f"the separate Python {self._python}" if self._python else "QGIS's Python"
            self.device_label.setText(f"Running in {where} on: {event['device']}")
            self._log(f"device: {event['device']}")
        elif kind == "note":
            self._log(event["message"])
            self.iface.messageBar().pushMessage("ChangeScribe", event["message"], Qgis.MessageLevel.Warning, 10)
        elif kind == "log":
            self._log(event.get("message", ""))

    def _on_done(self, outcome: RunOutcome) -> None:
        self.task = None
        self.last_outcome = outcome
        self.cancel_button.setEnabled(False)
        self._update_run_button()
        if outcome.cancelled:
            self.progress_bar.setValue(0)
            self.status_label.setText("Cancelled; nothing was written.")
            self._log("cancelled; nothing was written")
        elif outcome.error:
            self.progress_bar.setValue(0)
            self.show_error(outcome.error)
        else:
            self._show_result(outcome)
        self._show_device()

    def _show_result(self, outcome: RunOutcome) -> None:
        result = outcome.result or {}
        try:
            layer, _raster = add_result_layers(result, self._layer_name)
        except Exception as exc:  # noqa: BLE001 (a file QGIS cannot open must not become a traceback)
            self.show_error(str(exc))
            return
        self.last_layer = layer
        self.progress_bar.setValue(100)
        notes = " ".join(outcome.notes)
        self.results.show_result(result, layer, notes)
        self.status_label.setStyleSheet("")
        regions = plural(result.get("regions", 0), "change region")
        flagged = result.get("flagged") or 0
        flags = f", {plural(flagged, 'flagged caption')} (⚠)" if flagged else ""
        self.status_label.setText(f"Done in {outcome.seconds:.1f} s: {regions}{flags} in the '{GROUP_NAME}' group.")
        for line in result.get("alignment") or []:
            self._log(line)
        self._log(f"result: {result.get('output')}; scene caption: {result.get('scene_caption')}")
        self.iface.messageBar().pushMessage(
            "ChangeScribe", f"{regions}{flags}: {layer.name()}",
            Qgis.MessageLevel.Success, 5)

    def show_error(self, message: str) -> None:
        """Errors are one line in the dock and the message bar, never a traceback dialog."""
        self.status_label.setStyleSheet(ERROR_STYLE)
        self.status_label.setText(message)
        self._log("error: " + message)
        self.iface.messageBar().pushMessage("ChangeScribe", message, Qgis.MessageLevel.Critical, 10)

    def _log(self, text: str) -> None:
        self.log_edit.appendPlainText(text)

    def shutdown(self) -> None:
        """Called on plugin unload: stop a running task and drop project connections."""
        if self.task is not None:
            self.task.cancel()
        self.annotate.shutdown()
        project = QgsProject.instance()
        for signal, slot in ((project.layersAdded, self._layers_changed),
                             (project.layersRemoved, self._layers_changed)):
            try:
                signal.disconnect(slot)
            except (RuntimeError, TypeError):
                pass
        self.results.table.set_layer(None)


def fit_dock_width(root: QWidget) -> None:
    """Let every picker shrink to the width QGIS gives a new dock (about 300 px).

    A combo box asks by default for the width of its longest item (a long layer name, a device with its GPU's
    name), which forced the whole dock wider than its default and hid the buttons on the right.
    """
    for combo in root.findChildren(QComboBox):
        combo.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
        combo.setMinimumContentsLength(8)


def _label(name: str) -> QLabel:
    label = QLabel()
    label.setObjectName(name)
    label.setWordWrap(True)
    return label


def _section(title: str) -> QLabel:
    label = QLabel(f"<b>{title}</b>")
    return label
