"""``changescribe:captionregions``: a caption for each given polygon over a before/after pair.

The polygons can come from anywhere: drawn by an analyst, produced by another tool, or the regions of an
earlier ChangeScribe run with another model. The output is a copy of the input features with a ``caption``
field, in the input layer's CRS.
"""

from __future__ import annotations

from qgis.core import (
    QgsCoordinateReferenceSystem,
    QgsCoordinateTransform,
    QgsCsException,
    QgsFeature,
    QgsFeatureSink,
    QgsField,
    QgsFields,
    QgsGeometry,
    QgsProcessing,
    QgsProcessingException,
    QgsProcessingParameterFeatureSink,
    QgsProcessingParameterFeatureSource,
    QgsProcessingParameterNumber,
    QgsProcessingParameterRasterLayer,
    QgsRectangle,
)
from qgis.PyQt.QtCore import QVariant

from ..core.api import MAX_BEAM_SIZE
from .processing_support import (
    ChangeScribeAlgorithm,
    add_model_parameters,
    check_choices,
    device_choice,
    import_core,
    model_choice,
    processing_errors,
    raster_input,
    run_control,
)

CAPTION_FIELD = "caption"


class CaptionRegionsAlgorithm(ChangeScribeAlgorithm):
    BEFORE, AFTER, REGIONS = "BEFORE", "AFTER", "REGIONS"
    MODEL, MODEL_FILE, DEVICE, BEAM_SIZE = "MODEL", "MODEL_FILE", "DEVICE", "BEAM_SIZE"
    OUTPUT = "OUTPUT"

    def name(self) -> str:
        return "captionregions"

    def displayName(self) -> str:  # noqa: N802
        return "Caption change in regions"

    def tags(self) -> list[str]:
        return ["change", "caption", "describe", "before", "after", "bi-temporal", "polygons", "pix4cap"]

    def shortHelpString(self) -> str:  # noqa: N802
        return ("Says in a sentence what changed inside each polygon of REGIONS between the BEFORE and the AFTER "
                "raster. The AFTER raster is put onto the BEFORE raster's grid; each polygon is captioned from a "
                "square crop centred on it, at least as large as the ground the model was trained on (small "
                "polygons get context around them). The output is a copy of the input features, attributes "
                f"and geometries unchanged, with a '{CAPTION_FIELD}' text field (an existing field of that name is "
                "overwritten). Polygons outside the rasters' common footprint, or without geometry, get a NULL "
                "caption. Needs a captioning model (Pix4Cap); the captions are only as good as the model.")

    def initAlgorithm(self, config=None) -> None:  # noqa: N802
        add = self.add_described

        add(QgsProcessingParameterRasterLayer(self.BEFORE, "Before (earlier) raster"),
            "The earlier image; its grid is the one the crops are read on.")
        add(QgsProcessingParameterRasterLayer(self.AFTER, "After (later) raster"),
            "The later image of the same place; reprojected and resampled onto the before raster's grid if needed.")
        add(QgsProcessingParameterFeatureSource(self.REGIONS, "Regions to caption",
                                                [QgsProcessing.TypeVectorPolygon]),
            "Polygons to describe, in any CRS. Every feature is copied to the output with its caption.")
        add_model_parameters(self)
        add(QgsProcessingParameterNumber(self.BEAM_SIZE, "Caption beam size (0 = the model's own)",
                                         QgsProcessingParameterNumber.Integer, 0, minValue=0, maxValue=MAX_BEAM_SIZE),
            "Beam search width, as in Detect and caption changes: 0 uses the model's own setting from its card (e.g. "
            "3 for SEN, greedy for the shipped model); 1 is greedy decoding (fastest); 3 is the papers' setting.")
        add(QgsProcessingParameterFeatureSink(self.OUTPUT, "Captioned regions", QgsProcessing.TypeVectorPolygon),
            f"The input features with a '{CAPTION_FIELD}' field, in the input layer's CRS.")

    def checkParameterValues(self, parameters, context):  # noqa: N802
        ok, message, normalised = check_choices(self, parameters, context)
        if not ok:
            return ok, message
        return super().checkParameterValues(normalised, context)

    def processAlgorithm(self, parameters, context, feedback):  # noqa: N802
        captioning, device_mod, loading, raster_pair, run_control_mod = import_core(
            "captioning", "device", "model_loading", "raster_pair", "run_control")
        before = raster_input(self, parameters, self.BEFORE, context, "before")
        after = raster_input(self, parameters, self.AFTER, context, "after")
        source = self.parameterAsSource(parameters, self.REGIONS, context)
        if source is None:
            raise QgsProcessingException(self.invalidSourceError(parameters, self.REGIONS))
        beam_size = self.parameterAsInt(parameters, self.BEAM_SIZE, context) or None
        control = run_control(feedback, run_control_mod.RunControl)

        with processing_errors():
            raster_pair.validate_pair(before.source(), after.source())  # a bad raster should not wait for a model
            model = loading.load_model(model_choice(self, parameters, context),
                                       device_mod.resolve_device(device_choice(self, parameters, context)))
            if not model.can_caption:
                raise QgsProcessingException(
                    f"the model {model.name!r} cannot caption (it only detects change); choose a captioning "
                    f"model such as {loading.DEFAULT_MODEL}")
            feedback.pushInfo(f"model {model.name} {model.version}")
            beam_size = beam_size or model.default_beam_size
            with raster_pair.AlignedPair(before.source(), after.source(), bands=model.input_spec.bands) as pair:
                for line in pair.report.lines():
                    feedback.pushInfo(line)
                features, bounds = self._read_regions(source, before.crs(), pair, context, feedback)
                wanted = [b for b in bounds if b is not None]
                feedback.pushInfo(f"captioning {len(wanted)} of {len(features)} regions")
                texts = iter(captioning.caption_areas(pair, model, wanted, beam_size, control.stage(0.1, 0.95)))
                captions = [next(texts) if b is not None else None for b in bounds]
            control.check()

        # The sink is created only now, so a failed or cancelled run leaves no output behind.
        fields = QgsFields(source.fields())
        index = fields.lookupField(CAPTION_FIELD)
        if index < 0:
            fields.append(QgsField(CAPTION_FIELD, QVariant.String))
            index = fields.count() - 1
        else:
            feedback.pushWarning(f"the input already has a '{CAPTION_FIELD}' field; its values are replaced")
        sink, dest_id = self.parameterAsSink(parameters, self.OUTPUT, context, fields, source.wkbType(),
                                             source.sourceCrs())
        if sink is None:
            raise QgsProcessingException(self.invalidSinkError(parameters, self.OUTPUT))
        for feature, caption in zip(features, captions):
            out = QgsFeature(fields)
            if feature.hasGeometry():
                out.setGeometry(feature.geometry())
            attrs = list(feature.attributes())
            attrs += [None] * (fields.count() - len(attrs))
            attrs[index] = caption
            out.setAttributes(attrs)
            if not sink.addFeature(out, QgsFeatureSink.FastInsert):
                raise QgsProcessingException(self.writeFeatureError(sink, parameters, self.OUTPUT))
        feedback.setProgress(100.0)
        return {self.OUTPUT: dest_id}

    @staticmethod
    def _read_regions(source, grid_crs: QgsCoordinateReferenceSystem, pair, context, feedback):
        """The features, and for each its bounds on the pair's grid (None: no geometry or off the rasters)."""
        if not grid_crs.isValid():
            grid_crs = QgsCoordinateReferenceSystem.fromWkt(pair.grid.crs.to_wkt())
        src_crs = source.sourceCrs()
        transform = (QgsCoordinateTransform(src_crs, grid_crs, context.transformContext())
                     if src_crs.isValid() and src_crs != grid_crs else None)
        grid = QgsRectangle(*pair.grid.bounds)
        total = max(source.featureCount(), 1)
        features, bounds, outside = [], [], 0
        for i, feature in enumerate(source.getFeatures()):
            if feedback.isCanceled():
                break
            features.append(QgsFeature(feature))
            geom = feature.geometry()
            box = None
            if geom is not None and not geom.isNull() and not geom.isEmpty():
                geom = QgsGeometry(geom)
                try:
                    if transform is not None:
                        geom.transform(transform)
                    rect = geom.boundingBox()
                except QgsCsException:
                    rect = None
                if rect is not None and rect.intersects(grid):
                    box = (rect.xMinimum(), rect.yMinimum(), rect.xMaximum(), rect.yMaximum())
                else:
                    outside += 1
            bounds.append(box)
            feedback.setProgress(10.0 * (i + 1) / total)
        if outside:
            feedback.pushWarning(f"{outside} region(s) lie outside the rasters' common footprint: no caption")
        return features, bounds
