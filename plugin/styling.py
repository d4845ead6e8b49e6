"""Applying ChangeScribe's shipped QML style and scene caption to result layers."""

from __future__ import annotations

from qgis.core import QgsMapLayer, QgsProcessingLayerPostProcessorInterface

from .main import PLUGIN_DIR

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
