"""The dock's model section: model picker with its card, device, threshold, minimum area and "Advanced".

Cards are read with ``core.model_loading.installed_models`` (standard library only), so the list and the card
show even when PyTorch is missing from QGIS's Python.
"""

from __future__ import annotations

import html
from typing import Any

from qgis.gui import QgsCollapsibleGroupBox
from qgis.PyQt.QtCore import Qt, pyqtSignal
from qgis.PyQt.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFormLayout,
    QLabel,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from ..core.model_card import card_summary, metric_lines
from .settings import Settings

DEVICES = (("auto", "Auto"), ("cpu", "CPU"), ("cuda", "CUDA GPU"))
# The model picker's last entry: not a model, it opens the Import checkpoint dialog (dock_widgets_import.py).
IMPORT_ENTRY = "changescribe:import-checkpoint"
# The DetectRequest fields ModelPanel.request_options() sets.
PANEL_FIELDS = ("model", "detector", "device", "threshold", "min_area", "tile_size", "overlap", "batch_size",
                "target_gsd", "captions", "beam_size", "fill_nodata", "onnxruntime")


def list_models(extra_dirs: list[str]) -> tuple[list[dict[str, Any]], str | None]:
    """(cards, error): model folders are user-editable, so a broken one must not break the dock."""
    try:
        from ..core.model_loading import installed_models

        return installed_models(extra_dirs), None
    except Exception as exc:  # noqa: BLE001
        return [], f"cannot list models: {exc}"


def card_html(card: dict[str, Any]) -> str:
    """What the model detects and captions, at which GSD and tile size, trained on what, how well."""
    e = html.escape
    captions = bool(card.get("vocabulary"))
    inp = card.get("input", {})
    gsd = inp.get("gsd")
    rows = [f"<b>{e(card['name'])}</b> v{e(str(card.get('version', '?')))} · {e(card['architecture'])}",
            ("Finds changed areas and <b>captions</b> them (scene and each region)." if captions
             else "Finds changed areas (no captions)."),
            f"Input: {inp.get('bands', '?')} bands, tiles of {inp.get('tile_size', '?')} px, "
            + (f"trained at {gsd:g} m/px" if gsd else "any GSD")]
    if card.get("description"):
        rows.append(e(str(card["description"])))
    if card.get("training_data"):
        rows.append(f"Training data: {e(str(card['training_data']))}")
    rows += [e(line) for line in metric_lines(card)]
    if card.get("licence"):
        rows.append(f"Licence: {e(str(card['licence']))}")
    if card.get("weights_terms"):
        rows.append(f"Weights: {e(str(card['weights_terms']))}")
    # zero-width spaces after the separators let a long path wrap at the dock's width instead of running off it
    path = e(card.get("path", "")).replace("/", "/\u200b").replace("\\", "\\\u200b")
    rows.append(f"<span style='color:gray'>{path}</span>")
    return "<br>".join(rows)


class ModelPanel(QWidget):
    """Model, device and the numbers that steer a run; reads and writes :class:`Settings`."""

    import_requested = pyqtSignal()  # the picker's "Import checkpoint…" entry was chosen

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.cards: list[dict[str, Any]] = []
        self._model_index = -1  # the model chosen before "Import checkpoint…", restored after it
        self.model_combo = QComboBox()
        self.model_combo.setObjectName("changescribe_model")
        self.card_label = QLabel()
        self.card_label.setWordWrap(True)
        self.card_label.setTextFormat(Qt.TextFormat.RichText)
        self.card_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.card_summary = QLabel()
        self.card_summary.setObjectName("changescribe_card_summary")
        self.card_summary.setWordWrap(True)
        self.card_box = QgsCollapsibleGroupBox("Model card")
        self.card_box.setObjectName("changescribe_model_card")
        self.card_box.setCollapsed(True)  # QgsCollapsibleGroupBox remembers the user's choice from then on
        QVBoxLayout(self.card_box).addWidget(self.card_label)
        self.device_combo = QComboBox()
        self.device_combo.setObjectName("changescribe_device")
        for key, label in DEVICES:
            self.device_combo.addItem(label, key)
        self.threshold_spin = _double(0.01, 0.99, 0.05, 3, "Pixels at or above this change probability are change")
        self.min_area_spin = _double(0.0, 1e9, 10.0, 1, "Drop change regions smaller than this", " m²")
        self.probability_check = QCheckBox("Add the change probability raster")
        self.probability_check.setToolTip("Also add the 0–1 change probability map to the project, hidden")
        self.tile_spin = _int(0, 4096, "Tile size in pixels; 0 = the model's", special="model's")
        self.overlap_spin = _int(-1, 2048, "Overlap between tiles in pixels; -1 = tile/8", special="tile/8")
        self.batch_spin = _int(1, 256, "Tiles per batch: more is faster on a GPU but needs more memory")
        self.gsd_check = QCheckBox("Resample to the model's GSD")
        self.fill_check = QCheckBox("Border fill is no data")
        self.fill_check.setObjectName("changescribe_fill_nodata")
        self.fill_check.setChecked(True)
        self.fill_check.setToolTip("In a raster that declares no NoData value, constant black or white fill "
                                   "touching its border (mosaics, warped exports) is no data, never change")
        self.gsd_check.setToolTip("Resample both rasters to the resolution the model was trained at")
        self.onnx_check = QCheckBox("ONNX Runtime on the CPU")  # short: fits the dock's default width
        self.onnx_check.setObjectName("changescribe_onnxruntime")
        self.onnx_check.setChecked(True)
        self.onnx_check.setToolTip("On the CPU, run the change encoder and mask head on ONNX Runtime when the "
                                   "onnxruntime package is installed (several times faster); off: PyTorch only")
        self.captions_check = QCheckBox("Caption regions and scene")  # short: fits the dock's default width
        self.captions_check.setToolTip("With a captioning model, describe what changed in words; off: regions only "
                                       "(faster)")
        self.beam_spin = _int(0, 20, "Caption beam size: 1 = greedy (fastest); 0 = the model's own (e.g. 3 for SEN)",
                              special="model's")
        self.detector_combo = QComboBox()
        self.detector_combo.setObjectName("changescribe_detector")
        self._detector_setting: str | None = None
        self.detector_combo.setToolTip("The change detector that makes the mask: the model's own (its change head or "
                                       "its card's pairing), or another installed model; the captions stay the "
                                       "model's")
        self.advanced = QgsCollapsibleGroupBox("Advanced")
        self.advanced.setObjectName("changescribe_advanced")
        self.advanced.setCollapsed(True)
        adv = QFormLayout(self.advanced)
        adv.setRowWrapPolicy(QFormLayout.RowWrapPolicy.WrapLongRows)  # a field too wide goes under its label
        adv.addRow("Tile size", self.tile_spin)
        adv.addRow("Overlap", self.overlap_spin)
        adv.addRow("Batch size", self.batch_spin)
        adv.addRow(self.gsd_check)
        adv.addRow("Detector", self.detector_combo)
        adv.addRow(self.captions_check)
        adv.addRow(self.fill_check)
        adv.addRow(self.onnx_check)
        adv.addRow("Beam size", self.beam_spin)
        # The picker, its summary and card take the full width (under the dock's "Model" heading): word-wrapped
        # labels inside a form row get too little height, and a label column would squeeze the model's name.
        box = QVBoxLayout(self)
        box.setContentsMargins(0, 0, 0, 0)
        box.addWidget(self.model_combo)
        box.addWidget(self.card_summary)
        box.addWidget(self.card_box)
        form = QFormLayout()
        box.addLayout(form)
        form.addRow("Device", self.device_combo)
        form.addRow("Threshold", self.threshold_spin)
        form.addRow("Minimum area", self.min_area_spin)
        form.addRow(self.probability_check)
        form.addRow(self.advanced)
        self.model_combo.currentIndexChanged.connect(self._show_card)

    def refresh_models(self, extra_dirs: list[str], wanted: str = "") -> str | None:
        """Re-list the models and keep ``wanted`` (a card path or name) selected; returns an error or None."""
        wanted = wanted or (self.current_card() or {}).get("path", "")
        self.cards, error = list_models(extra_dirs)
        self.model_combo.blockSignals(True)
        self.model_combo.clear()
        for card in self.cards:
            self.model_combo.addItem(f"{card['name']} (v{card.get('version', '?')})", card["path"])
        self.model_combo.insertSeparator(len(self.cards))
        self.model_combo.addItem("Import checkpoint…", IMPORT_ENTRY)
        index = next((i for i, c in enumerate(self.cards) if wanted in (c["path"], c["name"])), 0)
        self.model_combo.setCurrentIndex(index if self.cards else -1)
        self._model_index = self.model_combo.currentIndex()
        self.model_combo.blockSignals(False)
        # before the first listing, the detector remembered in the settings (load() runs before it)
        chosen = self.detector_combo.currentData() if self.detector_combo.count() else self._detector_setting
        self.detector_combo.clear()
        self.detector_combo.addItem("The model's own", None)
        for card in self.cards:
            self.detector_combo.addItem(card["name"], card["name"])  # by name, as Processing and the CLI take it
        self.detector_combo.setCurrentIndex(max(self.detector_combo.findData(chosen), 0))
        self._show_card()
        return error

    def current_card(self) -> dict[str, Any] | None:
        i = self.model_combo.currentIndex()
        return self.cards[i] if 0 <= i < len(self.cards) else None

    def _show_card(self, _index: int = 0) -> None:
        if self.model_combo.currentData() == IMPORT_ENTRY:  # an action, not a model: keep the model shown
            self.model_combo.blockSignals(True)
            self.model_combo.setCurrentIndex(self._model_index)
            self.model_combo.blockSignals(False)
            self.import_requested.emit()
            return
        self._model_index = self.model_combo.currentIndex()
        card = self.current_card()
        self.card_summary.setText(card_summary(card) if card else "")
        self.card_label.setText(card_html(card) if card else
                                "No model found. Put a ChangeScribe model (.safetensors + .json card) in the "
                                "model folder chosen in Settings.")

    def device(self) -> str:
        return self.device_combo.currentData() or "auto"

    def request_options(self) -> dict[str, Any]:
        """The :class:`~changescribe.core.api.DetectRequest` fields these widgets choose (:data:`PANEL_FIELDS`):
        a tile size or beam size of 0 means the model's own, an overlap of -1 an eighth of the tile."""
        card = self.current_card()
        overlap = self.overlap_spin.value()
        return {"model": card["path"] if card else "", "detector": self.detector_combo.currentData() or None,
                "device": self.device(), "threshold": self.threshold_spin.value(),
                "min_area": self.min_area_spin.value(), "tile_size": self.tile_spin.value() or None,
                "overlap": None if overlap < 0 else overlap, "batch_size": self.batch_spin.value(),
                "target_gsd": "model" if self.gsd_check.isChecked() else None,
                "captions": self.captions_check.isChecked(), "beam_size": self.beam_spin.value() or None,
                "fill_nodata": self.fill_check.isChecked(), "onnxruntime": self.onnx_check.isChecked()}

    def set_probe(self, info: dict[str, Any]) -> None:
        """Label the device choices with what the Python that will run actually has."""
        devices = info.get("devices") or {}
        names = {"auto": "Auto", "cpu": "CPU", "cuda": "CUDA GPU"}
        for i in range(self.device_combo.count()):
            key = self.device_combo.itemData(i)
            detail = devices.get(key)
            if key == "cuda" and not detail and info.get("torch"):
                detail = "not available in this PyTorch"
            self.device_combo.setItemText(i, f"{names[key]} — {detail}" if detail else names[key])

    def load(self, s: Settings) -> None:
        index = self.device_combo.findData(s.get("device"))
        self.device_combo.setCurrentIndex(max(index, 0))
        self.threshold_spin.setValue(s.get("threshold"))
        self.min_area_spin.setValue(s.get("min_area"))
        self.probability_check.setChecked(s.get("probability_layer"))
        self.tile_spin.setValue(s.get("tile_size"))
        self.overlap_spin.setValue(s.get("overlap"))
        self.batch_spin.setValue(s.get("batch_size"))
        self.gsd_check.setChecked(s.get("model_gsd"))
        self.captions_check.setChecked(s.get("captions"))
        self.fill_check.setChecked(s.get("fill_nodata"))
        self.onnx_check.setChecked(s.get("onnxruntime"))
        self.beam_spin.setValue(s.get("beam_size"))
        self._detector_setting = s.get("detector") or None
        self.detector_combo.setCurrentIndex(max(self.detector_combo.findData(self._detector_setting), 0))

    def save(self, s: Settings) -> None:
        card = self.current_card()
        if card:
            s.set("model", card["path"])
        s.set("device", self.device())
        s.set("threshold", self.threshold_spin.value())
        s.set("min_area", self.min_area_spin.value())
        s.set("probability_layer", self.probability_check.isChecked())
        s.set("tile_size", self.tile_spin.value())
        s.set("overlap", self.overlap_spin.value())
        s.set("batch_size", self.batch_spin.value())
        s.set("model_gsd", self.gsd_check.isChecked())
        s.set("captions", self.captions_check.isChecked())
        s.set("fill_nodata", self.fill_check.isChecked())
        s.set("onnxruntime", self.onnx_check.isChecked())
        s.set("beam_size", self.beam_spin.value())
        s.set("detector", self.detector_combo.currentData() or "")


def _double(lo: float, hi: float, step: float, decimals: int, tip: str, suffix: str = "") -> QDoubleSpinBox:
    spin = QDoubleSpinBox()
    spin.setRange(lo, hi)
    spin.setSingleStep(step)
    spin.setDecimals(decimals)
    spin.setSuffix(suffix)
    spin.setToolTip(tip)
    return spin


def _int(lo: int, hi: int, tip: str, special: str = "") -> QSpinBox:
    spin = QSpinBox()
    spin.setRange(lo, hi)
    spin.setToolTip(tip)
    if special:
        spin.setSpecialValueText(special)
    return spin
