"""``changescribe:detectchanges``: the core pipeline as a Processing algorithm (toolbox, batch, modeler,
``processing.run`` and ``qgis_process``)."""

from __future__ import annotations

from pathlib import Path

from qgis.core import (
    QgsProcessing,
    QgsProcessingAlgorithm,
    QgsProcessingException,
    QgsProcessingOutputNumber,
    QgsProcessingOutputString,
    QgsProcessingParameterBoolean,
    QgsProcessingParameterEnum,
    QgsProcessingParameterNumber,
    QgsProcessingParameterRasterDestination,
    QgsProcessingParameterRasterLayer,
    QgsProcessingParameterString,
    QgsProcessingParameterVectorDestination,
)
from qgis.PyQt.QtGui import QIcon

from .main import ICON
from .styling import RegionsPostProcessor

DEVICES = ["auto", "cpu", "cuda"]


class DetectChangesAlgorithm(QgsProcessingAlgorithm):
    BEFORE, AFTER, MODEL, DEVICE = "BEFORE", "AFTER", "MODEL", "DEVICE"
    THRESHOLD, MIN_AREA, TILE_SIZE, OVERLAP, BATCH_SIZE = "THRESHOLD", "MIN_AREA", "TILE_SIZE", "OVERLAP", "BATCH_SIZE"
    CAPTIONS = "CAPTIONS"
    OUTPUT, OUTPUT_PROBABILITY, CAPTION, REGION_COUNT = "OUTPUT", "OUTPUT_PROBABILITY", "CAPTION", "REGION_COUNT"

    def name(self) -> str:
        return "detectchanges"

    def displayName(self) -> str:  # noqa: N802
        return "Detect and caption changes"

    def group(self) -> str:
        return "Change analysis"

    def groupId(self) -> str:  # noqa: N802
        return "changeanalysis"

    def icon(self) -> QIcon:
        return QIcon(ICON)

    def shortHelpString(self) -> str:  # noqa: N802
        return ("Compares a BEFORE and an AFTER raster of the same place. The AFTER raster is reprojected and "
                "resampled onto the BEFORE raster's grid, both are clipped to their common footprint, and a "
                "change model runs tile by tile (overlapping tiles are blended, so no seams). Pixels whose change "
                "probability reaches THRESHOLD become polygons; regions smaller than MIN_AREA (m²) are dropped. "
                "Each region gets its area, mean and maximum change probability and, with a captioning model, a "
                "sentence saying what changed; the scene caption is returned as CAPTION and stored in the "
                "GeoPackage. No data in either raster is never reported as change.")

    def createInstance(self) -> "DetectChangesAlgorithm":  # noqa: N802
        return DetectChangesAlgorithm()

    def initAlgorithm(self, config=None) -> None:  # noqa: N802
        self.addParameter(QgsProcessingParameterRasterLayer(self.BEFORE, "Before (earlier) raster"))
        self.addParameter(QgsProcessingParameterRasterLayer(self.AFTER, "After (later) raster"))
        model = QgsProcessingParameterString(self.MODEL, "Model (name or model card path)", defaultValue="default")
        model.setHelp("A model name from `changescribe models`, or the path of a model card (.json)")
        self.addParameter(model)
        self.addParameter(QgsProcessingParameterEnum(self.DEVICE, "Device", options=DEVICES, defaultValue=0))
        thr = QgsProcessingParameterNumber(self.THRESHOLD, "Change probability threshold",
                                           QgsProcessingParameterNumber.Double, 0.5, minValue=0.01, maxValue=0.99)
        thr.setHelp("Pixels at or above this probability count as change")
        self.addParameter(thr)
        self.addParameter(QgsProcessingParameterNumber(self.MIN_AREA, "Minimum region area (m²)",
                                                       QgsProcessingParameterNumber.Double, 0.0, minValue=0.0))
        self.addParameter(QgsProcessingParameterNumber(self.TILE_SIZE, "Tile size in pixels (0 = the model's)",
                                                       QgsProcessingParameterNumber.Integer, 0, minValue=0))
        self.addParameter(QgsProcessingParameterNumber(self.OVERLAP, "Tile overlap in pixels (-1 = tile/8)",
                                                       QgsProcessingParameterNumber.Integer, -1, minValue=-1))
        self.addParameter(QgsProcessingParameterNumber(self.BATCH_SIZE, "Tiles per batch",
                                                       QgsProcessingParameterNumber.Integer, 8, minValue=1))
        self.addParameter(QgsProcessingParameterBoolean(self.CAPTIONS, "Caption the scene and each region", True))
        self.addParameter(QgsProcessingParameterVectorDestination(self.OUTPUT, "Change regions",
                                                                  QgsProcessing.TypeVectorPolygon))
        self.addParameter(QgsProcessingParameterRasterDestination(self.OUTPUT_PROBABILITY, "Change probability",
                                                                  optional=True, createByDefault=False))
        self.addOutput(QgsProcessingOutputString(self.CAPTION, "Scene caption"))
        self.addOutput(QgsProcessingOutputNumber(self.REGION_COUNT, "Number of change regions"))

    def processAlgorithm(self, parameters, context, feedback):  # noqa: N802
        before = self.parameterAsRasterLayer(parameters, self.BEFORE, context)
        after = self.parameterAsRasterLayer(parameters, self.AFTER, context)
        if before is None or after is None:
            raise QgsProcessingException("both a before and an after raster are needed")
        out = self.parameterAsOutputLayer(parameters, self.OUTPUT, context)
        if Path(out).suffix.lower() != ".gpkg":
            raise QgsProcessingException(f"the change regions must be written to a GeoPackage (.gpkg), not {out}")
        prob = self.parameterAsOutputLayer(parameters, self.OUTPUT_PROBABILITY, context) or None
        tile = self.parameterAsInt(parameters, self.TILE_SIZE, context) or None
        overlap = self.parameterAsInt(parameters, self.OVERLAP, context)
        try:
            from ..core.errors import ChangeScribeError
            from ..core.pipeline import detect_changes
            from ..core.run_control import RunControl
        except ImportError as exc:
            raise QgsProcessingException(
                f"ChangeScribe cannot run: {exc}. Install PyTorch, rasterio and geopandas into QGIS's Python "
                "(see the plugin's README)") from None

        control = RunControl(on_progress=lambda f, m: feedback.setProgress(100.0 * f),
                             is_cancelled=feedback.isCanceled, on_log=feedback.pushInfo)
        try:
            result = detect_changes(
                before.source(), after.source(), self.parameterAsString(parameters, self.MODEL, context) or "default",
                out, threshold=self.parameterAsDouble(parameters, self.THRESHOLD, context),
                min_area=self.parameterAsDouble(parameters, self.MIN_AREA, context), tile_size=tile,
                overlap=None if overlap < 0 else overlap,
                batch_size=self.parameterAsInt(parameters, self.BATCH_SIZE, context),
                device=DEVICES[self.parameterAsEnum(parameters, self.DEVICE, context)],
                probability_output=prob, captions=self.parameterAsBool(parameters, self.CAPTIONS, context),
                control=control)
        except ChangeScribeError as exc:
            raise QgsProcessingException(str(exc)) from None
        feedback.pushInfo(f"{len(result.regions)} change regions; scene caption: {result.scene_caption}")
        uri = f"{result.output}|layername=change_regions"
        self._load_styled(context, out, uri, result.scene_caption)
        return {self.OUTPUT: uri,
                self.OUTPUT_PROBABILITY: str(result.probability) if result.probability else None,
                self.CAPTION: result.scene_caption, self.REGION_COUNT: len(result.regions)}

    @staticmethod
    def _load_styled(context, destination: str, uri: str, scene_caption: str) -> None:
        """Load the GeoPackage's regions layer (not the whole file) with the shipped style, if QGIS loads results."""
        if not context.willLoadLayerOnCompletion(destination):
            return
        layers = context.layersToLoadOnCompletion()
        details = layers.pop(destination)
        details.setPostProcessor(RegionsPostProcessor.create(scene_caption))
        layers[uri] = details
        context.setLayersToLoadOnCompletion(layers)
