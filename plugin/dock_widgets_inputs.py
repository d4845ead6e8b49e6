"""The dock's input section: before/after raster pickers, which-is-which guess, alignment preview, AOI.

The alignment line comes from ``core.raster_pair.validate_pair`` (rasterio only, no pixels read), so users see
what will be reprojected, resampled and clipped before a run starts.
"""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path

from qgis.core import (
    Qgis,
    QgsCoordinateReferenceSystem,
    QgsGeometry,
    QgsMapLayerProxyModel,
    QgsProject,
    QgsRasterLayer,
    QgsVectorLayer,
)
from qgis.gui import QgsMapLayerComboBox
from qgis.PyQt.QtCore import pyqtSignal
from qgis.PyQt.QtWidgets import QComboBox, QGridLayout, QLabel, QToolButton, QWidget

_LAYER_FILTER = getattr(Qgis, "LayerFilter", None) or QgsMapLayerProxyModel.Filter  # QGIS ≥ 3.34 / older

BEFORE_WORDS = {"pre", "before", "old", "older", "earlier", "t1", "t0", "first", "prior", "past", "previous"}
AFTER_WORDS = {"post", "after", "new", "newer", "later", "t2", "second", "current", "recent", "latest"}
_YMD = re.compile(r"(?<!\d)(19\d\d|20\d\d)([-_.]?)(0[1-9]|1[0-2])\2(0[1-9]|[12]\d|3[01])(?!\d)")
_YM = re.compile(r"(?<!\d)(19\d\d|20\d\d)[-_.](0[1-9]|1[0-2])(?!\d)")
_Y = re.compile(r"(?<!\d)(19\d\d|20\d\d)(?!\d)")
AOI_NONE, AOI_EXTENT, AOI_SELECTION = 0, 1, 2


@dataclass(frozen=True)
class TimeHint:
    """A date (year, month, day; 0 when unknown) and/or a before/after word found for one raster."""

    date: tuple[int, int, int] | None = None
    role: str | None = None  # "before" | "after"


def find_date(text: str) -> tuple[int, int, int] | None:
    """The first date in ``text``: 20190501, 2019-05-01, 2019_05, or a bare year like 2019."""
    for pattern in (_YMD, _YM, _Y):
        m = pattern.search(text)
        if m:
            nums = [int(g) for g in m.groups() if g and g.isdigit()]
            return tuple((nums + [0, 0])[:3])  # type: ignore[return-value]
    return None


def find_role(text: str) -> str | None:
    """'pre'/'before'/'old'/'t1'... or 'post'/'after'/'new'/'t2'..., as whole words (not 'prepared')."""
    low = text.lower()
    tokens = set(re.split(r"[^a-z0-9]+", low)) | set(re.findall(r"[a-z]+", low))
    before, after = bool(tokens & BEFORE_WORDS), bool(tokens & AFTER_WORDS)
    if before != after:
        return "before" if before else "after"
    return None


def time_hint(*texts: str) -> TimeHint:
    """Combine what the texts say, earlier texts first (metadata before names)."""
    date = next((d for d in (find_date(t) for t in texts if t) if d), None)
    role = next((r for r in (find_role(t) for t in texts if t) if r), None)
    return TimeHint(date, role)


def order(a: TimeHint, b: TimeHint) -> int:
    """-1: a is earlier; 1: b is earlier; 0: cannot tell. Dates win over words."""
    if a.date and b.date and a.date != b.date:
        # a bare year (month 0) against a full date of the same year cannot be ordered
        if a.date[0] != b.date[0] or (a.date[1] and b.date[1]):
            return -1 if a.date < b.date else 1
    if a.role and b.role and a.role != b.role:
        return -1 if a.role == "before" else 1
    return 0


def gdal_source(layer: QgsRasterLayer | None) -> str | None:
    """The file rasterio can open, for GDAL-provider rasters only (WMS/XYZ have no file to compare)."""
    if layer is None or layer.providerType() != "gdal":
        return None
    return layer.source()


def layer_hint(layer: QgsRasterLayer) -> TimeHint:
    texts = [_gdal_datetime(layer), layer.metadata().title(), layer.name()]
    source = gdal_source(layer)
    if source:
        texts.append(Path(source.split("|")[0]).stem)
    return time_hint(*[t for t in texts if t])


def _gdal_datetime(layer: QgsRasterLayer) -> str:
    """Acquisition date from the raster's own metadata (IMAGERY domain or TIFF tag), when GDAL has one."""
    source = gdal_source(layer)
    if not source:
        return ""
    try:
        from osgeo import gdal

        ds = gdal.Open(source)
        if ds is None:
            return ""
        return (ds.GetMetadataItem("ACQUISITIONDATETIME", "IMAGERY") or ds.GetMetadataItem("TIFFTAG_DATETIME")
                or ds.GetMetadataItem("ACQUISITION_DATE") or "")
    except Exception:  # noqa: BLE001 (a hint, never an error)
        return ""


def describe_alignment(before: str, after: str, fill_nodata: bool = True) -> tuple[bool, str]:
    """(ok, one line): what aligning the pair will do, or why the pair cannot be compared."""
    if importlib.util.find_spec("rasterio") is None:
        return True, "Alignment is checked when the run starts (rasterio is not installed in QGIS's Python)."
    from ..core.errors import ChangeScribeError
    from ..core.raster_pair import validate_pair

    try:
        r = validate_pair(before, after)
    except ChangeScribeError as exc:
        return False, str(exc)
    except Exception as exc:  # noqa: BLE001 (rasterio errors for odd sources)
        return False, f"cannot read the pair: {exc}"
    parts = [f"Aligned onto the before grid: {r.crs}, {_res(r.output_res)}, {r.width}×{r.height} px"]
    if r.after_reprojected:
        note = next((n for n in r.notes if n.startswith("after: ") and " → " in n), "")
        parts.append("after reprojected" + (f" from {note[7:].split(' → ')[0]}" if note else ""))
    if abs(r.after_res[0] - r.output_res[0]) > 1e-3 * r.output_res[0]:
        parts.append(f"after resampled from {_res(r.after_res)}")
    parts.append(f"{'clipped to the ' if r.clipped else ''}overlap {r.overlap_area_m2 / 1e6:.3f} km²")
    if r.undeclared_nodata:
        who = " and ".join(r.undeclared_nodata)
        parts.append(f"{who} declare{'s' if len(r.undeclared_nodata) == 1 else ''} no NoData: black/white border "
                     + ("fill is no data" if fill_nodata else "fill is read as image"))
    return True, "; ".join(parts) + "."


def _res(res: tuple[float, float]) -> str:
    return f"{res[0]:.3g} m" if abs(res[0] - res[1]) <= 1e-3 * res[0] else f"{res[0]:.3g}×{res[1]:.3g} m"


def project_rasters() -> list[QgsRasterLayer]:
    """The project's file-based rasters, the ones a pair can be made of."""
    return [lyr for lyr in QgsProject.instance().mapLayers().values()
            if isinstance(lyr, QgsRasterLayer) and gdal_source(lyr)]


def guess_pair(rasters: list[QgsRasterLayer]) -> tuple[QgsRasterLayer, QgsRasterLayer] | None:
    """(before, after) from the first two rasters, ordered by dates or words; None with fewer than two."""
    if len(rasters) < 2:
        return None
    a, b = rasters[0], rasters[1]
    return (b, a) if order(layer_hint(a), layer_hint(b)) > 0 else (a, b)


def crs_text(crs: QgsCoordinateReferenceSystem) -> str:
    """An authority id when there is one (EPSG:…), else WKT: both are what rasterio accepts."""
    auth = crs.authid()
    return auth if auth and ":" in auth else crs.toWkt(QgsCoordinateReferenceSystem.WktVariant.WKT2_2019)


class PairPicker(QWidget):
    """Before/after pickers with a swap button, a which-is-which hint and the alignment preview."""

    changed = pyqtSignal()

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        grid = QGridLayout(self)
        grid.setContentsMargins(0, 0, 0, 0)
        self.before_combo = self._raster_combo()
        self.after_combo = self._raster_combo()
        self.swap_button = QToolButton()
        self.swap_button.setText("⇅")
        self.swap_button.setToolTip("Swap before and after")
        self.swap_button.setObjectName("changescribe_swap")
        self.hint_label = _note_label("changescribe_order_hint")
        self.alignment_label = _note_label("changescribe_alignment")
        self.aoi_combo = QComboBox()
        self.aoi_combo.addItems(["Whole overlap", "Current map extent", "Selected features of"])
        self.aoi_layer_combo = QgsMapLayerComboBox()
        self.aoi_layer_combo.setFilters(_LAYER_FILTER.PolygonLayer)
        self.aoi_layer_combo.setVisible(False)
        grid.addWidget(QLabel("Before"), 0, 0)
        grid.addWidget(self.before_combo, 0, 1)
        grid.addWidget(self.swap_button, 0, 2, 2, 1)
        grid.addWidget(QLabel("After"), 1, 0)
        grid.addWidget(self.after_combo, 1, 1)
        grid.addWidget(self.hint_label, 2, 0, 1, 3)
        grid.addWidget(self.alignment_label, 3, 0, 1, 3)
        grid.addWidget(QLabel("Area"), 4, 0)
        grid.addWidget(self.aoi_combo, 4, 1, 1, 2)
        grid.addWidget(self.aoi_layer_combo, 5, 1, 1, 2)
        grid.setColumnStretch(1, 1)
        self._auto = True  # until the user picks a layer, the pickers follow the guess
        self.fill_nodata = True  # the dock's "Border fill is no data" choice, said in the alignment line
        self.swap_button.clicked.connect(self.swap)
        self.before_combo.layerChanged.connect(self._user_changed)
        self.after_combo.layerChanged.connect(self._user_changed)
        self.aoi_combo.currentIndexChanged.connect(self._aoi_changed)
        self.aoi_layer_combo.layerChanged.connect(lambda _: self.changed.emit())

    @staticmethod
    def _raster_combo() -> QgsMapLayerComboBox:
        combo = QgsMapLayerComboBox()
        combo.setFilters(_LAYER_FILTER.RasterLayer)
        combo.setAllowEmptyLayer(True)
        return combo

    def before_layer(self) -> QgsRasterLayer | None:
        return self.before_combo.currentLayer()

    def after_layer(self) -> QgsRasterLayer | None:
        return self.after_combo.currentLayer()

    def set_pair(self, before, after) -> None:
        for combo, layer in ((self.before_combo, before), (self.after_combo, after)):
            combo.blockSignals(True)
            combo.setLayer(layer)
            combo.blockSignals(False)
        self.refresh()

    def set_fill_nodata(self, on: bool) -> None:
        self.fill_nodata = bool(on)
        self.refresh()

    def swap(self) -> None:
        self._auto = False
        self.set_pair(self.after_layer(), self.before_layer())

    def _user_changed(self, _layer=None) -> None:
        self._auto = False
        self.refresh()

    def _aoi_changed(self, index: int) -> None:
        self.aoi_layer_combo.setVisible(index == AOI_SELECTION)
        self.refresh()

    def guess(self, rasters: list[QgsRasterLayer]) -> None:
        """Fill the pickers from the project's rasters while the user has not chosen: ordered by the guess."""
        if not self._auto and self.before_layer() and self.after_layer():
            return
        pair = guess_pair(rasters)
        if pair is None:
            self.refresh()
            return
        self.set_pair(*pair)
        self._auto = True

    def refresh(self) -> None:
        """Recompute the which-is-which hint and the alignment line, then tell the dock."""
        before, after = self.before_layer(), self.after_layer()
        self.hint_label.setText(self._order_hint(before, after))
        self.hint_label.setVisible(bool(self.hint_label.text()))
        ok, text = self.alignment()
        self.alignment_label.setText(text)
        self.alignment_label.setProperty("ok", ok)
        self.alignment_label.setStyleSheet("" if ok else "color: #b3140b;")
        self.changed.emit()

    def alignment(self) -> tuple[bool, str]:
        before, after = self.before_layer(), self.after_layer()
        if before is None or after is None:
            return False, "Pick a before and an after raster (add them to the project first)."
        if before.id() == after.id():
            return False, "Before and after are the same layer."
        b, a = gdal_source(before), gdal_source(after)
        if not b or not a:
            return False, "Only file-based (GDAL) rasters can be compared, not web or virtual layers."
        return describe_alignment(b, a, self.fill_nodata)

    @staticmethod
    def _order_hint(before, after) -> str:
        if before is None or after is None or before.id() == after.id():
            return ""
        hb, ha = layer_hint(before), layer_hint(after)
        if order(hb, ha) > 0:
            why = (f"dated {_fmt_date(hb.date)} and {_fmt_date(ha.date)}" if hb.date and ha.date
                   else f"named '{hb.role}' and '{ha.role}'")
            return f"⚠ These look reversed ({why}): use ⇅ to swap."
        return ""

    def area_of_interest(self, canvas) -> dict | None:
        """``{"wkt", "crs"}`` for the worker job, or None for the whole overlap; ValueError when unusable."""
        mode = self.aoi_combo.currentIndex()
        if mode == AOI_EXTENT:
            extent = canvas.extent()
            return {"wkt": QgsGeometry.fromRect(extent).asWkt(),
                    "crs": crs_text(canvas.mapSettings().destinationCrs())}
        if mode == AOI_SELECTION:
            layer: QgsVectorLayer | None = self.aoi_layer_combo.currentLayer()
            if layer is None:
                raise ValueError("choose the polygon layer whose selected features limit the run")
            geoms = [f.geometry() for f in layer.selectedFeatures() if f.hasGeometry()]
            if not geoms:
                raise ValueError(f"select one or more features of '{layer.name()}' to limit the run to them")
            return {"wkt": QgsGeometry.unaryUnion(geoms).asWkt(), "crs": crs_text(layer.crs())}
        return None


def _fmt_date(d: tuple[int, int, int]) -> str:
    y, m, day = d
    return f"{y}" + (f"-{m:02d}" if m else "") + (f"-{day:02d}" if day else "")


def _note_label(name: str) -> QLabel:
    label = QLabel()
    label.setObjectName(name)
    label.setWordWrap(True)
    return label
