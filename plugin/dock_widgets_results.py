"""The dock's result section and the result layers: scene caption, per-region table synced with the map.

Layers go into a "ChangeScribe" group; the table and the layer share one selection (either side drives the
other), and clicking a row zooms to the region and flashes it, so captions can be checked against the imagery.
"""

from __future__ import annotations

import html
from typing import Any

from qgis.core import (
    QgsCoordinateTransform,
    QgsFeatureRequest,
    QgsProject,
    QgsRasterLayer,
    QgsVectorLayer,
)
from qgis.PyQt.QtCore import QItemSelectionModel, Qt
from qgis.PyQt.QtGui import QBrush, QColor
from qgis.PyQt.QtWidgets import (
    QAbstractItemView,
    QApplication,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QPlainTextEdit,
    QPushButton,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from ..core.errors import ChangeScribeError
from .styling import style_probability_layer, style_regions_layer

GROUP_NAME = "ChangeScribe"
REGIONS_LAYER = "change_regions"
RUN_PROPERTY = "changescribe/run"
COLUMNS = ("#", "Area", "Probability", "Caption")
FID_ROLE = Qt.ItemDataRole.UserRole
FLAG_ROLE = Qt.ItemDataRole.UserRole + 1  # a flagged row's reason (the decoder's sentence contradicts the facts)
FLAG_MARK = "⚠ "
FLAG_BACKGROUND = QColor(255, 236, 179)


def add_result_layers(result: dict[str, Any], name: str) -> tuple[QgsVectorLayer, QgsRasterLayer | None]:
    """The run's GeoPackage layer (styled, captioned) and the optional probability raster, hidden."""
    project = QgsProject.instance()
    root = project.layerTreeRoot()
    group = root.findGroup(GROUP_NAME) or root.insertGroup(0, GROUP_NAME)
    layer = QgsVectorLayer(f"{result['output']}|layername={REGIONS_LAYER}", name, "ogr")
    if not layer.isValid():
        raise ChangeScribeError(f"QGIS cannot open the result {result['output']}")
    style_regions_layer(layer, result.get("scene_caption"))
    layer.setCustomProperty(RUN_PROPERTY, result.get("output"))
    project.addMapLayer(layer, False)
    group.insertLayer(0, layer)
    raster = None
    if result.get("probability"):
        raster = QgsRasterLayer(result["probability"], f"{name} · change probability", "gdal")
        if raster.isValid():
            style_probability_layer(raster)
            project.addMapLayer(raster, False)
            group.insertLayer(1, raster).setItemVisibilityChecked(False)
        else:
            raster = None
    return layer, raster


def caption_share(feature) -> int:
    """How many regions share this region's caption (1: its own crop; 0: no caption). Layers written before the
    ``caption_regions`` field existed count a non-empty caption as the region's own."""
    names = feature.fields().names()
    if "caption_regions" in names and feature["caption_regions"] is not None:
        return int(feature["caption_regions"])
    return 1 if feature["caption"] else 0


def field_text(feature, name: str) -> str:
    """A text attribute of a region, "" when the layer predates the field or the value is NULL."""
    if name not in feature.fields().names():
        return ""
    value = feature[name]
    return value if isinstance(value, str) else ""


def format_area(m2: float) -> str:
    return f"{m2:,.0f} m²" if m2 < 10_000 else f"{m2 / 10_000:,.2f} ha"


def zoom_and_flash(canvas, layer: QgsVectorLayer, fids: list[int]) -> None:
    """Zoom to the regions with some context around them, then flash them."""
    feats = list(layer.getFeatures(QgsFeatureRequest().setFilterFids(fids)))
    geoms = [f.geometry() for f in feats if f.hasGeometry()]
    if not geoms:
        return
    rect = geoms[0].boundingBox()
    for g in geoms[1:]:
        rect.combineExtentWith(g.boundingBox())
    tr = QgsCoordinateTransform(layer.crs(), canvas.mapSettings().destinationCrs(), QgsProject.instance())
    rect = tr.transformBoundingBox(rect)
    side = max(rect.width(), rect.height(), 1e-9)
    rect.grow(side)  # the region in the middle third: enough surroundings to judge the caption
    canvas.setExtent(rect)
    canvas.refresh()
    canvas.flashFeatureIds(layer, fids)


class RegionsTable(QTableWidget):
    """One row per change region; selection mirrors the layer's, a click zooms and flashes."""

    def __init__(self, canvas, parent: QWidget | None = None):
        super().__init__(0, len(COLUMNS), parent)
        self.canvas = canvas
        self.layer: QgsVectorLayer | None = None
        self._syncing = False
        self.setObjectName("changescribe_regions")
        self.setHorizontalHeaderLabels(COLUMNS)
        self.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.setSelectionMode(QAbstractItemView.SelectionMode.ExtendedSelection)
        self.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.setWordWrap(True)
        self.verticalHeader().setVisible(False)
        header = self.horizontalHeader()
        for col in range(3):
            header.setSectionResizeMode(col, QHeaderView.ResizeMode.ResizeToContents)
        header.setSectionResizeMode(3, QHeaderView.ResizeMode.Stretch)
        self.itemSelectionChanged.connect(self._table_to_layer)
        self.cellClicked.connect(lambda row, _col: self.zoom_to_rows([row]))

    def set_layer(self, layer: QgsVectorLayer | None) -> None:
        if self.layer is not None:
            try:
                self.layer.selectionChanged.disconnect(self._layer_to_table)
                self.layer.willBeDeleted.disconnect(self._layer_gone)
            except (RuntimeError, TypeError):
                pass
        self.layer = layer
        self.setSortingEnabled(False)
        self.setRowCount(0)
        if layer is None:
            return
        rows = sorted(layer.getFeatures(), key=lambda f: -float(f["area_m2"] or 0))
        self.setRowCount(len(rows))
        for r, f in enumerate(rows):
            shared = caption_share(f)
            flag = field_text(f, "caption_flag")
            caption = (f["caption"] or "") if shared else "— (no caption)"
            values = (int(f["region_id"]), float(f["area_m2"] or 0), float(f["mean_prob"] or 0),
                      FLAG_MARK + caption if flag else caption)
            for c, value in enumerate(values):
                item = QTableWidgetItem()
                if c == 1:
                    item.setData(Qt.ItemDataRole.DisplayRole, format_area(value))
                    item.setTextAlignment(int(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter))
                elif c == 2:
                    item.setData(Qt.ItemDataRole.DisplayRole, round(value, 3))
                else:
                    item.setData(Qt.ItemDataRole.DisplayRole, value)
                item.setData(FID_ROLE, f.id())
                if flag:
                    item.setData(FLAG_ROLE, flag)
                    item.setBackground(QBrush(FLAG_BACKGROUND))
                if c == 3:
                    tip = str(value) if shared <= 1 else (
                        f"{value}\n(the decoder described the area around this region and {shared - 1} nearby "
                        "small region(s): they share one decoder caption)")
                    said = field_text(f, "model_caption")
                    if said:
                        tip += f"\nDecoder: {said}"
                    if flag:
                        tip += f"\nFlagged: {flag}"
                    item.setToolTip(tip)
                self.setItem(r, c, item)
        self.resizeRowsToContents()
        layer.selectionChanged.connect(self._layer_to_table)
        layer.willBeDeleted.connect(self._layer_gone)

    def _layer_gone(self) -> None:
        self.layer = None
        self.setRowCount(0)

    def fid(self, row: int) -> int:
        return int(self.item(row, 0).data(FID_ROLE))

    def selected_fids(self) -> list[int]:
        return sorted({self.fid(i.row()) for i in self.selectedIndexes()})

    def _table_to_layer(self) -> None:
        if self._syncing or self.layer is None:
            return
        self._syncing = True
        try:
            self.layer.selectByIds(self.selected_fids())
        finally:
            self._syncing = False

    def _layer_to_table(self, *_args) -> None:
        if self._syncing or self.layer is None:
            return
        wanted = set(self.layer.selectedFeatureIds())
        self._syncing = True
        try:
            self.clearSelection()
            model, sel = self.model(), self.selectionModel()
            flags = QItemSelectionModel.SelectionFlag.Select | QItemSelectionModel.SelectionFlag.Rows
            for row in range(self.rowCount()):
                if self.fid(row) in wanted:
                    sel.select(model.index(row, 0), flags)
        finally:
            self._syncing = False

    def zoom_to_rows(self, rows: list[int]) -> None:
        if self.layer is not None and rows:
            zoom_and_flash(self.canvas, self.layer, [self.fid(r) for r in rows])


class ResultsPanel(QWidget):
    """Scene caption (selectable, with Copy), a one-line summary and the regions table."""

    def __init__(self, canvas, parent: QWidget | None = None):
        super().__init__(parent)
        self.summary_label = QLabel()
        self.summary_label.setObjectName("changescribe_summary")
        self.summary_label.setWordWrap(True)
        self.caption_edit = QPlainTextEdit()
        self.caption_edit.setObjectName("changescribe_scene_caption")
        self.caption_edit.setReadOnly(True)
        self.caption_edit.setPlaceholderText("The scene caption appears here after a run.")
        self.caption_edit.setMaximumHeight(72)
        self.copy_button = QPushButton("Copy")
        self.copy_button.setToolTip("Copy the scene caption")
        self.copy_button.clicked.connect(self.copy_caption)
        self.table = RegionsTable(canvas)
        row = QHBoxLayout()
        row.addWidget(QLabel("Scene caption"))
        row.addStretch(1)
        row.addWidget(self.copy_button)
        box = QVBoxLayout(self)
        box.setContentsMargins(0, 0, 0, 0)
        box.addWidget(self.summary_label)
        box.addLayout(row)
        box.addWidget(self.caption_edit)
        box.addWidget(self.table, 1)

    def copy_caption(self) -> None:
        QApplication.clipboard().setText(self.caption_edit.toPlainText())

    def show_result(self, result: dict[str, Any], layer: QgsVectorLayer | None, extra: str = "") -> None:
        self.caption_edit.setPlainText(result.get("scene_caption") or "")
        how = ("re-used the cached probability map (no new inference)" if result.get("reused_probability")
               else f"{result.get('tiles', 0)} tiles on {result.get('device', '?')}")
        summary = html.escape(result.get("summary") or f"{result.get('regions', 0)} change regions")
        self.summary_label.setText(f"<b>{summary}</b> — {how}.{(' ' + html.escape(extra)) if extra else ''}")
        self.table.set_layer(layer)

    def clear(self) -> None:
        self.summary_label.clear()
        self.caption_edit.clear()
        self.table.set_layer(None)
