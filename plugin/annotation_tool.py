"""The map tool analysts annotate with: drag a rectangle, click a polygon's vertices, or click a change region.

* **Rectangle** mode: press, drag, release. A click without a drag picks the change region under the cursor
  (from the layers :attr:`AnnotationMapTool.region_layers` returns), if any.
* **Polygon** mode: left-click each vertex, right-click (or double-click) to close; Backspace drops the last
  vertex, Esc cancels.

The result is emitted as :attr:`AnnotationMapTool.areaDrawn` with a ``QgsGeometry`` in the map canvas CRS.
"""

from __future__ import annotations

from typing import Callable

from qgis.core import (
    QgsCoordinateTransform,
    QgsFeatureRequest,
    QgsGeometry,
    QgsPointXY,
    QgsProject,
    QgsRectangle,
    QgsVectorLayer,
    QgsWkbTypes,
)
from qgis.gui import QgsMapTool, QgsRubberBand
from qgis.PyQt.QtCore import Qt, pyqtSignal
from qgis.PyQt.QtGui import QColor

RECTANGLE, POLYGON = "rectangle", "polygon"
CLICK_TOLERANCE_PX = 4


class AnnotationMapTool(QgsMapTool):
    areaDrawn = pyqtSignal(QgsGeometry)  # noqa: N815 (Qt naming)

    def __init__(self, canvas, mode: str = RECTANGLE,
                 region_layers: Callable[[], list[QgsVectorLayer]] | None = None):
        super().__init__(canvas)
        self.canvas = canvas
        self.mode = mode
        self.region_layers = region_layers or (lambda: [])
        self.band = QgsRubberBand(canvas, QgsWkbTypes.PolygonGeometry)
        self.band.setColor(QColor(255, 140, 0, 90))
        self.band.setStrokeColor(QColor(255, 90, 0))
        self.band.setWidth(2)
        self._start: QgsPointXY | None = None
        self._start_px = None
        self._vertices: list[QgsPointXY] = []
        self.setCursor(Qt.CrossCursor)

    def set_mode(self, mode: str) -> None:
        self.reset()
        self.mode = mode

    def reset(self) -> None:
        self._start, self._start_px, self._vertices = None, None, []
        self.band.reset(QgsWkbTypes.PolygonGeometry)

    # ---- rectangle ----------------------------------------------------------------------------------------
    def canvasPressEvent(self, e) -> None:  # noqa: N802
        if self.mode == RECTANGLE and e.button() == Qt.LeftButton:
            self._start = self.toMapCoordinates(e.pos())
            self._start_px = e.pos()

    def canvasMoveEvent(self, e) -> None:  # noqa: N802
        p = self.toMapCoordinates(e.pos())
        if self.mode == RECTANGLE and self._start is not None:
            self.band.setToGeometry(QgsGeometry.fromRect(QgsRectangle(self._start, p)), None)
        elif self.mode == POLYGON and self._vertices:
            self.band.setToGeometry(QgsGeometry.fromPolygonXY([self._vertices + [p]]), None)

    def canvasReleaseEvent(self, e) -> None:  # noqa: N802
        p = self.toMapCoordinates(e.pos())
        if self.mode == RECTANGLE:
            if self._start is None or e.button() != Qt.LeftButton:
                return
            moved = (e.pos() - self._start_px).manhattanLength() > CLICK_TOLERANCE_PX
            start = self._start
            self.reset()
            if moved:
                self.emit_area(QgsGeometry.fromRect(QgsRectangle(start, p)))
            else:
                region = self.region_at(p)
                if region is not None:
                    self.emit_area(region)
            return
        if e.button() == Qt.RightButton:
            self.finish_polygon()
        elif e.button() == Qt.LeftButton:
            self._vertices.append(p)
            self.canvasMoveEvent(e)

    def canvasDoubleClickEvent(self, e) -> None:  # noqa: N802
        if self.mode == POLYGON:
            self.finish_polygon()

    def keyPressEvent(self, e) -> None:  # noqa: N802
        if e.key() == Qt.Key_Escape:
            self.reset()
        elif e.key() == Qt.Key_Backspace and self._vertices:
            self._vertices.pop()
            if len(self._vertices) >= 2:
                self.band.setToGeometry(QgsGeometry.fromPolygonXY([self._vertices]), None)
            else:
                self.band.reset(QgsWkbTypes.PolygonGeometry)

    def finish_polygon(self) -> None:
        # a double click also delivers a release: drop a repeated last vertex
        pts = [p for i, p in enumerate(self._vertices) if i == 0 or p != self._vertices[i - 1]]
        self.reset()
        if len(pts) >= 3:
            self.emit_area(QgsGeometry.fromPolygonXY([pts]))

    # ---- picking a change region ----------------------------------------------------------------------------
    def region_at(self, point: QgsPointXY) -> QgsGeometry | None:
        """The geometry (canvas CRS) of the first polygon under ``point`` in the region layers."""
        canvas_crs = self.canvas.mapSettings().destinationCrs()
        tol = self.canvas.mapUnitsPerPixel() * CLICK_TOLERANCE_PX
        for layer in self.region_layers():
            try:
                if layer is None or not layer.isValid() or layer.geometryType() != QgsWkbTypes.PolygonGeometry:
                    continue
            except RuntimeError:  # the layer was removed from the project (its C++ object is gone)
                continue
            to_layer = QgsCoordinateTransform(canvas_crs, layer.crs(), QgsProject.instance())
            rect = to_layer.transformBoundingBox(QgsRectangle(point.x() - tol, point.y() - tol,
                                                              point.x() + tol, point.y() + tol))
            probe = QgsGeometry.fromPointXY(to_layer.transform(point))
            for f in layer.getFeatures(QgsFeatureRequest().setFilterRect(rect)):
                g = QgsGeometry(f.geometry())
                if g.intersects(probe) or g.distance(probe) <= rect.width() / 2:
                    g.transform(QgsCoordinateTransform(layer.crs(), canvas_crs, QgsProject.instance()))
                    return g
        return None

    def emit_area(self, geometry: QgsGeometry) -> None:
        if geometry is not None and not geometry.isEmpty() and geometry.area() > 0:
            self.band.setToGeometry(geometry, None)  # stays visible until the next drawing
            self.areaDrawn.emit(geometry)

    def deactivate(self) -> None:
        self._start, self._vertices = None, []
        super().deactivate()

    def clear(self) -> None:
        self.reset()
