"""Settings dialog: output and model folders, where the pipeline runs, and creating a worker environment."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from qgis.core import QgsApplication
from qgis.gui import QgsFileWidget
from qgis.PyQt.QtWidgets import (
    QComboBox,
    QDialog,
    QDialogButtonBox,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from .environment import EnvironmentPlan, ProbeTask, default_base_python, plan_environment, shell_line
from .settings import EXECUTION_MODES, Settings, default_output_folder

EXECUTION_LABELS = {"auto": "Auto: QGIS's Python if it has PyTorch, else the separate environment",
                    "qgis": "QGIS's Python", "worker": "Separate Python environment (worker)"}


def _path_widget(mode, value: str, placeholder: str, name: str) -> QgsFileWidget:
    w = QgsFileWidget()
    w.setStorageMode(mode)
    w.setFilePath(value)
    w.lineEdit().setPlaceholderText(placeholder)
    w.setObjectName(name)
    return w


class SettingsDialog(QDialog):
    """Edits :class:`Settings`; "Create environment" hands an :class:`EnvironmentPlan` to ``on_create``."""

    def __init__(self, settings: Settings, on_create: Callable[[EnvironmentPlan], None],
                 parent: QWidget | None = None):
        super().__init__(parent)
        self.setWindowTitle("ChangeScribe settings")
        self.setObjectName("changescribe_settings")
        self.settings, self.on_create = settings, on_create
        self._probe: ProbeTask | None = None
        dirs, files = QgsFileWidget.StorageMode.GetDirectory, QgsFileWidget.StorageMode.GetFile
        self.output_edit = _path_widget(dirs, settings.get("output_folder"), str(default_output_folder()),
                                        "changescribe_output_folder")
        self.model_edit = _path_widget(dirs, settings.get("model_folder"), "only the installed models",
                                       "changescribe_model_folder")
        self.execution_combo = QComboBox()
        for mode in EXECUTION_MODES:
            self.execution_combo.addItem(EXECUTION_LABELS[mode], mode)
        self.execution_combo.setCurrentIndex(max(self.execution_combo.findData(settings.execution()), 0))
        self.python_edit = _path_widget(files, settings.get("python"), "e.g. /path/to/venv/bin/python",
                                        "changescribe_python")
        self.check_button = QPushButton("Check")
        self.check_label = QLabel()
        self.check_label.setWordWrap(True)
        self.env_edit = _path_widget(dirs, str(settings.env_folder()), "", "changescribe_env_folder")
        self.base_edit = _path_widget(files, settings.get("base_python") or default_base_python(), "",
                                      "changescribe_base_python")
        self.plan_label = QLabel()
        self.plan_label.setWordWrap(True)
        self.create_button = QPushButton("Create environment")

        form = QFormLayout()
        form.addRow("Output folder", self.output_edit)
        form.addRow("Extra model folder", self.model_edit)
        form.addRow("Run in", self.execution_combo)
        py_row = QHBoxLayout()
        py_row.addWidget(self.python_edit, 1)
        py_row.addWidget(self.check_button)
        form.addRow("Worker Python", py_row)
        form.addRow(self.check_label)
        env_box = QGroupBox("Create a separate Python environment with PyTorch")
        env_form = QFormLayout(env_box)
        env_form.addRow("New environment folder", self.env_edit)
        env_form.addRow("Made from the Python", self.base_edit)
        env_form.addRow(self.plan_label)
        env_form.addRow(self.create_button)
        buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Ok | QDialogButtonBox.StandardButton.Cancel)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addWidget(env_box)
        layout.addWidget(buttons)
        buttons.accepted.connect(self.accept)
        buttons.rejected.connect(self.reject)
        self.check_button.clicked.connect(self.check_python)
        self.create_button.clicked.connect(self._create)
        self.env_edit.fileChanged.connect(self._show_plan)
        self.base_edit.fileChanged.connect(self._show_plan)
        self._show_plan()
        self.resize(640, self.sizeHint().height())

    def plan(self) -> EnvironmentPlan:
        return plan_environment(self.base_edit.filePath() or default_base_python(), Path(self.env_edit.filePath()))

    def _show_plan(self, *_args) -> None:
        self.plan_label.setText("Runs:<br>" + "<br>".join(f"<code>{shell_line(c)}</code>" for c in self.plan().commands)
                                + "<br>then uses its Python as the worker. PyTorch is a large download (GBs).")

    def check_python(self) -> None:
        python = self.python_edit.filePath()
        if not python:
            self.check_label.setText("Choose a Python executable first.")
            return
        self.check_label.setText("Checking…")
        self._probe = ProbeTask(python)
        self._probe.done.connect(self._checked)
        QgsApplication.taskManager().addTask(self._probe)

    def _checked(self, info: dict) -> None:
        self._probe = None
        if info.get("error"):
            self.check_label.setText(f"✗ {info['error']}")
        elif info.get("missing"):
            self.check_label.setText(f"✗ Python {info.get('version')} lacks {', '.join(info['missing'])}")
        else:
            self.check_label.setText(f"✓ Python {info.get('version')}, PyTorch {info.get('torch')}: runs on "
                                     f"{info.get('devices', {}).get('auto', '?')}")

    def _create(self) -> None:
        self.save()
        self.on_create(self.plan())
        self.accept()

    def save(self) -> None:
        s = self.settings
        s.set("output_folder", self.output_edit.filePath())
        s.set("model_folder", self.model_edit.filePath())
        s.set("execution", self.execution_combo.currentData())
        s.set("python", self.python_edit.filePath())
        s.set("env_folder", self.env_edit.filePath())
        s.set("base_python", self.base_edit.filePath())

    def accept(self) -> None:  # noqa: D102
        self.save()
        super().accept()
