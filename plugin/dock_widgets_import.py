"""The model picker's *Import checkpoint…*: a published checkpoint -> a model file in the model folder.

The dialog asks for the checkpoint, where it was published (family and dataset), a name and the model folder; the
task runs :func:`changescribe.core.published.import_checkpoint` in QGIS's Python when it has PyTorch, else in the
separate Python the dock runs in (the worker's ``--import``), so it works wherever a run works.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qgis.core import QgsApplication, QgsTask
from qgis.gui import QgsFileWidget
from qgis.PyQt.QtCore import pyqtSignal
from qgis.PyQt.QtWidgets import QComboBox, QDialog, QDialogButtonBox, QFormLayout, QLabel, QLineEdit, QWidget

from ..core.published import FAMILIES, default_name, published_checkpoints


def default_model_folder() -> Path:
    """Where imported models go when Settings names no model folder: the QGIS profile, never the plugin folder."""
    return Path(QgsApplication.qgisSettingsDirPath()) / "changescribe" / "models"


class ImportDialog(QDialog):
    """Checkpoint file, its source (family + dataset), model name and folder."""

    def __init__(self, folder: str, parent: QWidget | None = None):
        super().__init__(parent)
        self.setWindowTitle("Import published checkpoint")
        self.setObjectName("changescribe_import_dialog")
        self.checkpoint = QgsFileWidget()
        self.checkpoint.setObjectName("changescribe_import_checkpoint")
        self.checkpoint.setFilter("PyTorch checkpoints (*.pt *.pth *.ckpt *.bin *.tar);;All files (*)")
        self.source = QComboBox()
        self.source.setObjectName("changescribe_import_source")
        for family, dataset, label in published_checkpoints():
            self.source.addItem(label, (family, dataset))
        self.name = QLineEdit()
        self.name.setObjectName("changescribe_import_name")
        self.folder = QgsFileWidget()
        self.folder.setObjectName("changescribe_import_folder")
        self.folder.setStorageMode(QgsFileWidget.StorageMode.GetDirectory)
        self.folder.setFilePath(folder)
        note = QLabel("Read with torch.load(weights_only=True): a file that holds pickled Python objects is refused, "
                      "never run. An existing model file is never replaced.")
        note.setWordWrap(True)
        buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Ok | QDialogButtonBox.StandardButton.Cancel)
        buttons.accepted.connect(self.accept)
        buttons.rejected.connect(self.reject)
        form = QFormLayout(self)
        form.addRow("Checkpoint", self.checkpoint)
        form.addRow("Published by", self.source)
        form.addRow("Model name", self.name)
        form.addRow("Model folder", self.folder)
        form.addRow(note)
        form.addRow(buttons)
        self.source.currentIndexChanged.connect(self._placeholder)
        self._placeholder()

    def _placeholder(self, *_args) -> None:
        family, dataset = self.source.currentData()
        self.name.setPlaceholderText(default_name(FAMILIES[family], dataset))

    def job(self) -> dict[str, Any]:
        """The import job (the worker's ``--import`` line): checkpoint, family, dataset, name, folder."""
        family, dataset = self.source.currentData()
        return {"checkpoint": self.checkpoint.filePath(), "family": family, "dataset": dataset,
                "name": self.name.text().strip() or None, "folder": self.folder.filePath()}


class ImportTask(QgsTask):
    """One import, off the main thread; ``done`` carries (ok, card path or one-line error)."""

    done = pyqtSignal(object)

    def __init__(self, job: dict[str, Any], python: str | None):
        super().__init__("ChangeScribe: import checkpoint", QgsTask.Flag.CanCancel)
        self.job, self.python = job, python
        self.outcome: tuple[bool, str] = (False, "not run")

    def run(self) -> bool:  # noqa: D102 (QgsTask)
        try:
            if self.python:
                from .worker_client import import_in_python

                card = import_in_python(self.python, self.job)
            else:
                from ..core.published import import_checkpoint

                card = str(import_checkpoint(self.job["checkpoint"], self.job["family"], self.job["folder"],
                                             name=self.job.get("name"), dataset=self.job.get("dataset")))
            self.outcome = (True, card)
        except ImportError as exc:
            self.outcome = (False, f"QGIS's Python cannot import {exc.name or exc}: importing needs PyTorch; choose "
                                   "a Python environment that has it in Settings → Run in")
        except Exception as exc:  # noqa: BLE001 (one line in the dock, never a traceback dialog)
            from ..core.errors import ChangeScribeError

            text = str(exc) if isinstance(exc, ChangeScribeError) else f"unexpected {type(exc).__name__}: {exc}"
            self.outcome = (False, " ".join(text.split()))
        return self.outcome[0]

    def finished(self, ok: bool) -> None:  # noqa: D102 (QgsTask; main thread)
        self.done.emit(self.outcome)
