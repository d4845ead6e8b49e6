"""``changescribe:exporttrainingdata``: analysts' annotations + the two rasters -> a LEVIR-MCI training set.

The work is :func:`changescribe.core.training_export.export_training_data`; this wraps it for the toolbox,
the modeler, batch mode and ``qgis_process``.
"""

from __future__ import annotations

from qgis.core import (
    QgsProcessing,
    QgsProcessingException,
    QgsProcessingParameterFolderDestination,
    QgsProcessingParameterNumber,
    QgsProcessingParameterRasterLayer,
    QgsProcessingParameterVectorLayer,
    QgsProcessingOutputNumber,
    QgsProviderRegistry,
)

from .processing_support import ChangeScribeAlgorithm, import_core, processing_errors, raster_input, run_control


def layer_path(layer) -> str:
    """The file behind an OGR vector layer (``path|layername=...`` -> path)."""
    parts = QgsProviderRegistry.instance().decodeUri(layer.providerType(), layer.source())
    return parts.get("path") or layer.source().split("|")[0]


class ExportTrainingDataAlgorithm(ChangeScribeAlgorithm):
    ANNOTATIONS, BEFORE, AFTER = "ANNOTATIONS", "BEFORE", "AFTER"
    TILE_SIZE, GSD, SEED, OUTPUT = "TILE_SIZE", "GSD", "SEED", "OUTPUT"
    CHIPS = "CHIPS"

    def name(self) -> str:
        return "exporttrainingdata"

    def displayName(self) -> str:  # noqa: N802
        return "Export annotations as training data"

    def tags(self) -> list[str]:
        return ["annotation", "training", "dataset", "levir", "levir-mci", "levir-cc", "caption", "export"]

    def shortHelpString(self) -> str:  # noqa: N802
        return ("Turns the analysts' annotations (a ChangeScribe annotation GeoPackage) and the BEFORE/AFTER "
                "rasters into a training set in the LEVIR-MCI layout that ChangeScribe's training reads: "
                "images/{train,val,test}/{A,B,label}/NAME.png plus LevirCCcaptions.json. Each annotation gives "
                "one chip of TILE_SIZE pixels at GSD metres, centred on it; the label is the change map drawn "
                "from the annotated change polygons in the chip (building 1, road 2, vegetation 3, water 4, "
                "other 5; a no-change annotation gives an all-zero label and the caption 'there is no "
                "difference'). Chips are split into train/val/test by area (70/15/15 %, seeded), so chips that "
                "overlap or lie close together always share a split and no ground leaks into validation or test. "
                "The folder is written completely under a temporary name first. Save (commit) edits to the "
                "annotation layer before exporting: unsaved edits are not exported.")

    def initAlgorithm(self, config=None) -> None:  # noqa: N802
        add = self.add_described

        add(QgsProcessingParameterVectorLayer(self.ANNOTATIONS, "Annotation store",
                                              [QgsProcessing.TypeVectorPolygon]),
            "The ChangeScribe annotation GeoPackage (layer 'annotations') the analysts edited.")
        add(QgsProcessingParameterRasterLayer(self.BEFORE, "Before (earlier) raster"),
            "The earlier image the annotations were drawn over; its grid is the one chips are cut from.")
        add(QgsProcessingParameterRasterLayer(self.AFTER, "After (later) raster"),
            "The later image of the same place; put onto the before raster's grid if needed.")
        add(QgsProcessingParameterNumber(self.TILE_SIZE, "Chip size (px, 0 = the default model's)",
                                         QgsProcessingParameterNumber.Integer, 0, minValue=0, maxValue=4096),
            "Side of each chip in pixels; 0 takes the default model's tile size.")
        add(QgsProcessingParameterNumber(self.GSD, "Chip GSD (m, 0 = the default model's)",
                                         QgsProcessingParameterNumber.Double, 0.0, minValue=0.0),
            "Ground sample distance of the chips in metres; 0 takes the default model's GSD.")
        add(QgsProcessingParameterNumber(self.SEED, "Split seed", QgsProcessingParameterNumber.Integer, 0,
                                         minValue=0), "Seed of the random assignment of spatial blocks to "
                                                      "train/val/test; the same seed gives the same splits.",
            advanced=True)
        add(QgsProcessingParameterFolderDestination(self.OUTPUT, "Training data folder"),
            "An empty (or new) folder, or an earlier export to replace, for the LEVIR-MCI dataset.")
        self.addOutput(QgsProcessingOutputNumber(self.CHIPS, "Chips written"))

    def processAlgorithm(self, parameters, context, feedback):  # noqa: N802
        annotations_mod, export, run_control_mod = import_core("annotations", "training_export", "run_control")
        layer = self.parameterAsVectorLayer(parameters, self.ANNOTATIONS, context)
        if layer is None or not layer.isValid():
            raise QgsProcessingException("the annotation store cannot be opened")
        if layer.isEditable() and layer.isModified():
            feedback.pushWarning("the annotation layer has unsaved edits; only saved annotations are exported")
        store = layer_path(layer)
        before = raster_input(self, parameters, self.BEFORE, context, "before")
        after = raster_input(self, parameters, self.AFTER, context, "after")
        out = self.parameterAsString(parameters, self.OUTPUT, context)
        if not out:
            raise QgsProcessingException("no output folder was given")
        control = run_control(feedback, run_control_mod.RunControl)
        with processing_errors():
            summary = export.export_training_data(
                store, before.source(), after.source(), out,
                tile_size=self.parameterAsInt(parameters, self.TILE_SIZE, context) or None,
                gsd=self.parameterAsDouble(parameters, self.GSD, context) or None,
                seed=self.parameterAsInt(parameters, self.SEED, context), control=control)
        feedback.pushInfo(summary.line())
        feedback.setProgress(100.0)
        return {self.OUTPUT: str(summary.out_dir), self.CHIPS: sum(summary.counts.values())}
