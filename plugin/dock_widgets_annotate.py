"""The dock's *Annotate* section: draw an area, get the model's suggested caption, correct it, save it safely.

Annotations go to a ChangeScribe annotation GeoPackage (:mod:`changescribe.core.annotations`) that the analyst
opens or creates here. Each accepted annotation is added through the layer's edit buffer (one undoable edit
command) and committed at once; a commit that fails leaves the feature in the edit buffer and says so, so
nothing typed is lost. The suggestion runs in a QgsTask (QGIS stays responsive), in QGIS's Python or, when the
dock runs in a separate Python environment, through the same worker (:mod:`changescribe.core.suggestion`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from qgis.core import (
    QgsApplication,
    QgsCoordinateReferenceSystem,
    QgsCoordinateTransform,
    QgsFeature,
    QgsGeometry,
    QgsProject,
    QgsTask,
    QgsVectorLayer,
)
from qgis.PyQt.QtCore import pyqtSignal
from qgis.PyQt.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFileDialog,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPlainTextEdit,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from .annotation_tool import POLYGON, RECTANGLE, AnnotationMapTool
from .dock_widgets_inputs import gdal_source

CLASSES = ("", "building", "road", "vegetation", "water", "other")  # "" = not classified
ERROR_STYLE = "color: #b3140b;"


def _core(name: str):
    import importlib

    return importlib.import_module(f"..core.{name}", __package__)


def largest_part(geometry: QgsGeometry) -> QgsGeometry:
    """A single polygon (the store's geometry type): a multi-polygon keeps its largest part."""
    if not geometry.isMultipart():
        return QgsGeometry(geometry)
    parts = [QgsGeometry.fromPolygonXY(p) for p in geometry.asMultiPolygon()]
    return max(parts, key=lambda g: g.area()) if parts else QgsGeometry()


class AnnotatePanel(QWidget):
    """Store picker, drawing buttons, suggestion, caption editor, class, no-change, Save and Export."""

    saved = pyqtSignal(int)  # feature id of the committed annotation

    def __init__(self, canvas, pair: Callable[[], tuple[Any, Any]], card: Callable[[], dict | None],
                 region_layers: Callable[[], list] | None = None, parent: QWidget | None = None,
                 python: Callable[[], str | None] | None = None):
        super().__init__(parent)
        self.canvas = canvas
        self._pair, self._card = pair, card
        self._python = python or (lambda: None)  # None: QGIS's Python, else the worker's python
        self._typed = ""  # the caption as it was before "No change here" replaced it
        self.layer: QgsVectorLayer | None = None
        self.store: Path | None = None
        self.geometry: QgsGeometry | None = None  # canvas CRS
        self.suggested = ""
        self.task: QgsTask | None = None
        self._models: dict = {}
        self.tool = AnnotationMapTool(canvas, RECTANGLE, region_layers)
        self.tool.areaDrawn.connect(self.set_area)

        self.store_edit = QLineEdit()
        self.store_edit.setReadOnly(True)
        self.store_edit.setPlaceholderText("no annotation store")
        self.open_button = QPushButton("Open…")
        self.new_button = QPushButton("New…")
        self.rect_button = QPushButton("Draw rectangle")
        self.poly_button = QPushButton("Draw polygon")
        for b in (self.rect_button, self.poly_button):
            b.setCheckable(True)
        self.suggested_label = QLabel()
        self.suggested_label.setWordWrap(True)
        self.suggested_label.setObjectName("changescribe_suggested")
        self.caption_edit = QPlainTextEdit()
        self.caption_edit.setObjectName("changescribe_caption_edit")
        self.caption_edit.setPlaceholderText("caption of the drawn area (the suggestion appears here; correct it)")
        self.caption_edit.setMaximumHeight(70)
        self.class_combo = QComboBox()
        for c in CLASSES:
            self.class_combo.addItem(c or "— not classified —", c)
        self.no_change_check = QCheckBox("No change here")
        self.no_change_check.setToolTip(f"Store this area as unchanged, captioned "
                                        f"'{_core('annotations').NO_CHANGE_CAPTION}'")
        self.keep_class_check = QCheckBox("Keep the class for the next area")
        self.keep_class_check.setObjectName("changescribe_keep_class")
        self.keep_class_check.setToolTip("Unticked, the class goes back to 'not classified' after each save")
        self.save_button = QPushButton("Accept && save")
        self.save_button.setObjectName("changescribe_annotation_save")
        self.export_button = QPushButton("Export training data…")
        self.status_label = QLabel()
        self.status_label.setWordWrap(True)
        self.status_label.setObjectName("changescribe_annotation_status")

        # One column, labels above their fields: reads at the dock's default width (about 300 px).
        box = QVBoxLayout(self)
        box.setContentsMargins(0, 0, 0, 0)
        box.addWidget(QLabel("Store"))
        box.addWidget(self.store_edit)
        box.addLayout(_row(self.open_button, self.new_button))
        box.addLayout(_row(self.rect_button, self.poly_button))
        box.addWidget(QLabel("Suggested"))
        box.addWidget(self.suggested_label)
        box.addWidget(QLabel("Caption"))
        box.addWidget(self.caption_edit)
        cls_row = QHBoxLayout()
        cls_row.addWidget(QLabel("Class"))
        cls_row.addWidget(self.class_combo, 1)
        box.addLayout(cls_row)
        box.addWidget(self.keep_class_check)
        box.addWidget(self.no_change_check)
        box.addLayout(_row(self.save_button))
        box.addLayout(_row(self.export_button))
        box.addWidget(self.status_label)

        self.open_button.clicked.connect(self._open_clicked)
        self.new_button.clicked.connect(self._new_clicked)
        self.rect_button.toggled.connect(lambda on: self._draw(RECTANGLE, on))
        self.poly_button.toggled.connect(lambda on: self._draw(POLYGON, on))
        self.no_change_check.toggled.connect(self._no_change_toggled)
        self.save_button.clicked.connect(self.save)
        self.export_button.clicked.connect(self.export_dialog)
        canvas.mapToolSet.connect(self._tool_changed)
        self._update_buttons()

    # ---- store -------------------------------------------------------------------------------------------
    def _open_clicked(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Open an annotation store", "", "GeoPackage (*.gpkg)")
        if path:
            self.set_store(path)

    def _new_clicked(self) -> None:
        path, _ = QFileDialog.getSaveFileName(self, "New annotation store", "annotations.gpkg",
                                              "GeoPackage (*.gpkg)")
        if path:
            self.new_store(path if path.lower().endswith(".gpkg") else path + ".gpkg")

    def new_store(self, path: str | Path) -> bool:
        before, _ = self._pair()
        crs = before.crs() if before is not None and before.crs().isValid() else \
            self.canvas.mapSettings().destinationCrs()
        try:
            _core("annotations").create_store(path, crs.authid() or crs.toWkt(QgsCoordinateReferenceSystem.WKT_PREFERRED))
        except Exception as exc:  # noqa: BLE001 - shown to the analyst, never a traceback dialog
            self.show_status(str(exc), error=True)
            return False
        return self.set_store(path)

    def set_store(self, path: str | Path) -> bool:
        try:
            _core("annotations").check_store(path)
            _core("annotations").drop_feature_count(path)  # an older store's count would go stale
        except Exception as exc:  # noqa: BLE001
            self.show_status(str(exc), error=True)
            return False
        path = Path(path).resolve()
        source = f"{path}|layername=annotations"
        layer = next((lyr for lyr in QgsProject.instance().mapLayers().values()
                      if isinstance(lyr, QgsVectorLayer) and lyr.source() == source), None)
        if layer is None:
            layer = QgsVectorLayer(source, f"Annotations ({path.stem})", "ogr")
            if not layer.isValid():
                self.show_status(f"QGIS cannot open {path} as a vector layer", error=True)
                return False
            QgsProject.instance().addMapLayer(layer)
        self.layer, self.store = layer, path
        self.store_edit.setText(str(path))
        self.show_status(f"annotation store: {path.name} ({layer.featureCount()} annotations)")
        self._update_buttons()
        return True

    # ---- drawing and suggestion ---------------------------------------------------------------------------------
    def _draw(self, mode: str, on: bool) -> None:
        other = self.poly_button if mode == RECTANGLE else self.rect_button
        if on:
            other.blockSignals(True)
            other.setChecked(False)
            other.blockSignals(False)
            self.tool.set_mode(mode)
            self.canvas.setMapTool(self.tool)
        elif self.canvas.mapTool() is self.tool and not other.isChecked():
            self.canvas.unsetMapTool(self.tool)

    def _tool_changed(self, new_tool, _old=None) -> None:
        if new_tool is not self.tool:
            for b in (self.rect_button, self.poly_button):
                b.blockSignals(True)
                b.setChecked(False)
                b.blockSignals(False)

    def set_area(self, geometry: QgsGeometry) -> None:
        """A drawn or picked area (canvas CRS): remember it and ask the model for a caption."""
        self.geometry = QgsGeometry(geometry)
        self.suggested = ""
        self.suggested_label.setText("…")
        self.caption_edit.setPlainText("")
        self._update_buttons()
        self.start_suggestion()

    def start_suggestion(self) -> bool:
        before, after = self._pair()
        card = self._card()
        b_src, a_src = gdal_source(before), gdal_source(after)
        if not (b_src and a_src and card and self.geometry is not None):
            self.suggested_label.setText("(pick a before/after pair and a model for a suggestion)")
            return False
        canvas_crs = self.canvas.mapSettings().destinationCrs()
        rect = self.geometry.boundingBox()
        bounds = (rect.xMinimum(), rect.yMinimum(), rect.xMaximum(), rect.yMaximum())
        crs_wkt = canvas_crs.toWkt(QgsCoordinateReferenceSystem.WKT_PREFERRED)
        suggestion = _core("suggestion")
        job = suggestion.SuggestionJob(b_src, a_src, card["path"], crs_wkt, bounds)
        models, python = self._models, self._python()
        geometry = self.geometry

        def run(_task):
            if python:
                from .worker_client import suggest_in_python

                return suggest_in_python(python, job.to_dict())
            return suggestion.suggest_caption(job, models)

        def done(exception, result=None):
            self.task = None
            if geometry is not self.geometry:
                return  # a newer area was drawn meanwhile
            if exception is not None:
                self.suggested_label.setText("(no suggestion)")
                self.show_status(f"suggestion failed: {exception}", error=True)
                return
            self.suggested = result or ""
            self.suggested_label.setText(self.suggested)
            if self.no_change_check.isChecked():
                self._typed = self._typed or self.suggested  # shown again if "No change here" is unticked
            elif not self.caption_edit.toPlainText().strip():
                self.caption_edit.setPlainText(self.suggested)

        self.task = QgsTask.fromFunction("ChangeScribe: suggest a caption", run, on_finished=done)
        QgsApplication.taskManager().addTask(self.task)
        return True

    def _no_change_toggled(self, on: bool) -> None:
        """Ticking "No change here" shows the caption that will be stored; unticking brings back the typed one."""
        self.class_combo.setEnabled(not on)
        self.caption_edit.setReadOnly(on)
        if on:
            self._typed = self.caption_edit.toPlainText()
            self.caption_edit.setPlainText(_core("annotations").NO_CHANGE_CAPTION)
        else:
            self.caption_edit.setPlainText(self._typed)
            self._typed = ""

    # ---- saving -----------------------------------------------------------------------------------------------
    def record(self) -> dict:
        before, after = self._pair()
        card = self._card() or {}
        no_change = self.no_change_check.isChecked()
        cls = None if no_change else (self.class_combo.currentData() or None)
        annotations = _core("annotations")
        caption = annotations.NO_CHANGE_CAPTION if no_change else self.caption_edit.toPlainText().strip()
        return annotations.annotation_record(
            caption, self.suggested, cls, no_change,
            gdal_source(before) or "", gdal_source(after) or "", _layer_date(before), _layer_date(after),
            card.get("name", ""))

    def save(self) -> bool:
        """Add the area + caption to the store through the edit buffer (undoable) and commit it."""
        if self.layer is None or self.geometry is None:
            self.show_status("open or create an annotation store and draw an area first", error=True)
            return False
        if not self.caption_edit.toPlainText().strip() and not self.no_change_check.isChecked():
            self.show_status("write a caption (or tick 'No change here') before saving", error=True)
            return False
        try:
            _core("annotations").check_store(self.store)
            attrs = self.record()
        except Exception as exc:  # noqa: BLE001
            self.show_status(str(exc), error=True)
            return False
        layer = self.layer
        geom = QgsGeometry(self.geometry)
        canvas_crs = self.canvas.mapSettings().destinationCrs()
        if canvas_crs != layer.crs():
            geom.transform(QgsCoordinateTransform(canvas_crs, layer.crs(), QgsProject.instance()))
        geom = largest_part(geom)
        feature = QgsFeature(layer.fields())
        feature.setGeometry(geom)
        for name, value in attrs.items():
            feature[name] = value
        others_pending = layer.isEditable() and layer.isModified()  # the analyst's own unsaved edits, if any
        if not layer.isEditable() and not layer.startEditing():
            self.show_status(f"{self.store} cannot be edited", error=True)
            return False
        layer.beginEditCommand("ChangeScribe annotation")
        ok = layer.addFeature(feature)
        layer.endEditCommand() if ok else layer.destroyEditCommand()
        if not ok:
            self.show_status("QGIS refused the annotation (geometry or fields)", error=True)
            return False
        errors = self._commit(layer)
        if errors is not None:
            # Nothing is lost: the area, caption and class stay in this panel; the addition leaves the edit buffer
            # so that saving again (the retry) adds it once.
            if others_pending:
                layer.deleteFeature(feature.id())
            else:
                layer.rollBack()
            self.save_button.setText("Retry save")
            self.show_status(errors, error=True)
            return False
        self.save_button.setText("Accept && save")
        fid = max(layer.allFeatureIds(), default=-1)
        self.show_status(f"saved: {attrs['caption']!r} ({layer.featureCount()} annotations)")
        self.geometry = None
        self.tool.clear()
        self.caption_edit.setPlainText("")
        self.suggested_label.setText("")
        self.no_change_check.setChecked(False)
        self.caption_edit.setPlainText("")
        if not self.keep_class_check.isChecked():
            self.class_combo.setCurrentIndex(0)  # a class never carries over to the next area unasked
        self._update_buttons()
        self.saved.emit(fid)
        return True

    def _commit(self, layer: QgsVectorLayer) -> str | None:
        """Commit the edit buffer, waiting up to ``BUSY_TIMEOUT_S`` while another program writes the store;
        None on success, else the message for the analyst."""
        import time

        annotations = _core("annotations")
        started = time.monotonic()
        while not layer.commitChanges():
            problem = "; ".join(layer.commitErrors())
            waited = time.monotonic() - started
            if not annotations.is_busy(problem):
                return f"saving failed, the annotation is kept here (save again to retry): {problem}"
            if waited >= annotations.BUSY_TIMEOUT_S:
                return annotations.busy_message(self.store, waited)
            time.sleep(0.1)
        return None

    # ---- export ---------------------------------------------------------------------------------------------------
    def export_parameters(self) -> dict:
        before, after = self._pair()
        return {"ANNOTATIONS": self.layer, "BEFORE": gdal_source(before), "AFTER": gdal_source(after),
                "TILE_SIZE": 0, "GSD": 0.0, "SEED": 0}

    def export_dialog(self) -> None:
        import processing

        processing.execAlgorithmDialog("changescribe:exporttrainingdata", self.export_parameters())

    # ---- misc -----------------------------------------------------------------------------------------------------
    def _update_buttons(self) -> None:
        self.save_button.setEnabled(self.layer is not None and self.geometry is not None)
        self.export_button.setEnabled(self.layer is not None)

    def show_status(self, text: str, error: bool = False) -> None:
        self.status_label.setStyleSheet(ERROR_STYLE if error else "")
        self.status_label.setText(text)

    def shutdown(self) -> None:
        if self.canvas.mapTool() is self.tool:
            self.canvas.unsetMapTool(self.tool)
        self.tool.clear()
        try:
            self.canvas.mapToolSet.disconnect(self._tool_changed)
        except (RuntimeError, TypeError):
            pass


def _row(*widgets: QWidget) -> QHBoxLayout:
    """Buttons side by side, left-aligned."""
    row = QHBoxLayout()
    for w in widgets:
        row.addWidget(w)
    row.addStretch(1)
    return row


def _layer_date(layer) -> str:
    """The acquisition date the dock reads from a raster (metadata or name), ISO, or ''."""
    if layer is None:
        return ""
    try:
        from .dock_widgets_inputs import layer_hint

        hint = layer_hint(layer)
        d = getattr(hint, "date", None)
        return "-".join(f"{v:02d}" if i else f"{v:04d}" for i, v in enumerate(d) if v) if d else ""
    except Exception:  # noqa: BLE001 - a date is a nicety, never a reason not to save
        return ""


__all__ = ["AnnotatePanel", "largest_part"]
