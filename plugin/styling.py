"""Applying ChangeScribe's shipped QML style and scene caption to result layers, and the probability ramp."""

from __future__ import annotations

from qgis.core import (
    Qgis,
    QgsColorRampShader,
    QgsMapLayer,
    QgsProcessingLayerPostProcessorInterface,
    QgsRasterShader,
    QgsSingleBandPseudoColorRenderer,
)
from qgis.PyQt.QtGui import QColor

from .paths import PLUGIN_DIR

REGIONS_QML = PLUGIN_DIR / "resources" / "styles" / "change_regions.qml"


def style_regions_layer(layer: QgsMapLayer, scene_caption: str | None = None) -> bool:
    """Graduated-by-probability style, map tips with the caption; the scene caption as the layer abstract."""
    _, ok = layer.loadNamedStyle(str(REGIONS_QML))
    if scene_caption:
        layer.setAbstract(scene_caption)
        meta = layer.metadata()
        meta.setAbstract(scene_caption)
        layer.setMetadata(meta)
    layer.triggerRepaint()
    return bool(ok)


class RegionsPostProcessor(QgsProcessingLayerPostProcessorInterface):
    """Styles the regions layer when Processing loads it into the project."""

    _alive: list["RegionsPostProcessor"] = []  # Processing keeps only a C++ pointer: hold the Python object

    def __init__(self, scene_caption: str):
        super().__init__()
        self.scene_caption = scene_caption

    def postProcessLayer(self, layer, context, feedback):  # noqa: N802 (QGIS's name)
        style_regions_layer(layer, self.scene_caption)

    @classmethod
    def create(cls, scene_caption: str) -> "RegionsPostProcessor":
        cls._alive.append(cls(scene_caption))
        return cls._alive[-1]


def style_probability_layer(layer) -> None:
    """Change probability 0–1 as a light-to-dark red ramp matching the regions' colours (no data stays clear)."""
    stops = [(0.0, "#ffffcc"), (0.5, "#fd8d3c"), (0.8, "#d7301f"), (1.0, "#7f0000")]
    ramp = QgsColorRampShader(0.0, 1.0)
    method = getattr(Qgis, "ShaderInterpolationMethod", None)  # QGIS ≥ 3.28; the old enum is gone in QGIS 4
    ramp.setColorRampType(method.Linear if method is not None else QgsColorRampShader.Type.Interpolated)
    ramp.setColorRampItemList([QgsColorRampShader.ColorRampItem(v, QColor(c), f"{v:.1f}") for v, c in stops])
    shader = QgsRasterShader()
    shader.setRasterShaderFunction(ramp)
    renderer = QgsSingleBandPseudoColorRenderer(layer.dataProvider(), 1, shader)
    renderer.setClassificationMin(0.0)
    renderer.setClassificationMax(1.0)
    layer.setRenderer(renderer)
    layer.triggerRepaint()
