"""Processing provider ``changescribe``: the plugin's algorithms for the toolbox, modeler and qgis_process."""

from __future__ import annotations

from qgis.core import QgsProcessingProvider
from qgis.PyQt.QtGui import QIcon

from ..core.version import VERSION
from .paths import ICON


class ChangeScribeProvider(QgsProcessingProvider):
    def id(self) -> str:
        return "changescribe"

    def name(self) -> str:
        return "ChangeScribe"

    def longName(self) -> str:  # noqa: N802
        return f"ChangeScribe {VERSION}"

    def icon(self) -> QIcon:
        return QIcon(ICON)

    def versionInfo(self) -> str:  # noqa: N802
        return VERSION

    def supportedOutputVectorLayerExtensions(self) -> list[str]:  # noqa: N802
        # Results carry a run table beside the regions layer: only GeoPackage holds both.
        return ["gpkg"]

    def loadAlgorithms(self) -> None:  # noqa: N802
        # Only QGIS is imported here: torch and the models load when an algorithm runs, so the toolbox lists
        # the algorithms even where PyTorch is missing (running one then says how to install it).
        from .batch_algorithm import DetectChangesBatchAlgorithm
        from .caption_regions_algorithm import CaptionRegionsAlgorithm
        from .detect_changes_algorithm import DetectChangesAlgorithm
        from .export_training_algorithm import ExportTrainingDataAlgorithm
        from .import_checkpoint_algorithm import ImportCheckpointAlgorithm

        self.addAlgorithm(DetectChangesAlgorithm())
        self.addAlgorithm(CaptionRegionsAlgorithm())
        self.addAlgorithm(ExportTrainingDataAlgorithm())  # changescribe:exporttrainingdata (annotations)
        self.addAlgorithm(ImportCheckpointAlgorithm())  # changescribe:importcheckpoint (published weights)
        self.addAlgorithm(DetectChangesBatchAlgorithm())  # changescribe:detectchangesbatch (dask; many pairs)
