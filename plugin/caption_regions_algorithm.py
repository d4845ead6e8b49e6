"""``changescribe:captionregions``: a grounded caption for each given polygon over a before/after pair.

The polygons can come from anywhere: drawn by an analyst, produced by another tool, or the regions of an
earlier ChangeScribe run with another model. Each is grounded as a detected region is
(:func:`..core.captioning.caption_areas`): the output is a copy of the input features with the fields a detect run's
regions get (area, probability, facts, change type, grounded caption, the decoder's sentence and its flag), in the
input layer's CRS.
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
    QgsProcessingOutputNumber,
    QgsProcessingParameterFeatureSink,
    QgsProcessingParameterFeatureSource,
    QgsProcessingParameterNumber,
    QgsProcessingParameterRasterLayer,
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

# OGR field types of core's AREA_FIELDS (the names and types of a detect run's regions layer)
_QVARIANT = {"str": QVariant.String, "float": QVariant.Double, "int": QVariant.Int}


class CaptionRegionsAlgorithm(ChangeScribeAlgorithm):
    BEFORE, AFTER, REGIONS = "BEFORE", "AFTER", "REGIONS"
    MODEL, MODEL_FILE, DEVICE, BEAM_SIZE, THRESHOLD = "MODEL", "MODEL_FILE", "DEVICE", "BEAM_SIZE", "THRESHOLD"
    OUTPUT, FLAGGED_COUNT = "OUTPUT", "FLAGGED_COUNT"

    def name(self) -> str:
        return "captionregions"

    def displayName(self) -> str:  # noqa: N802
        return "Caption change in regions"

    def tags(self) -> list[str]:
        return ["change", "caption", "describe", "before", "after", "bi-temporal", "polygons", "pix4cap"]

    def shortHelpString(self) -> str:  # noqa: N802
        return ("Says what changed inside each polygon of REGIONS between the BEFORE and the AFTER raster, "
                "grounded as the regions of Detect and caption changes are. The AFTER raster is put onto the "
                "BEFORE raster's grid; each polygon's part in the rasters' common footprint is measured (area, "
                "shape, position in the scene, brightness, greenness and texture before vs after and, when the "
                "model detects change, its change probability and the parts of its change mask inside), the "
                "decoder captions it from a square crop centred on it, at least as large as the ground the model "
                "was trained on, and its sentence is checked against those facts. The output is a copy of the "
                "input features, attributes and geometries unchanged, with the fields a detected region gets: "
                "area_m2, mean_prob, max_prob, caption (built from the change type and facts), shape, "
                "compactness, elongation, orientation_deg, position, objects, brightness_change, "
                "greenness_change, texture_change, greenness_index, change_type, type_confidence, model_caption "
                "(the decoder's sentence) and caption_flag (why it contradicts the facts). An existing field of "
                "one of these names is overwritten. A polygon in which the model's mask has no pixel is a 'no "
                "change' area. With a captioner that cannot detect, mean_prob, max_prob and objects are NULL. "
                "Polygons outside the footprint, or without geometry, get NULL in every field. Needs a captioning "
                "model (Pix4Cap); the decoder's sentences are only as good as the model.")

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
        add(QgsProcessingParameterNumber(self.THRESHOLD, "Change probability threshold",
                                         QgsProcessingParameterNumber.Double, 0.5, minValue=0.01, maxValue=0.99),
            "As in Detect and caption changes: pixels whose change probability reaches it are the change mask "
            "inside each polygon (its objects; none: a 'no change' area), the others around it the unchanged "
            "ground its pixel changes are measured against.")
        add(QgsProcessingParameterFeatureSink(self.OUTPUT, "Captioned regions", QgsProcessing.TypeVectorPolygon),
            "The input features with the grounded fields of a detected region, in the input layer's CRS.")
        self.addOutput(QgsProcessingOutputNumber(self.FLAGGED_COUNT, "Number of regions whose decoder caption "
                                                                     "contradicts their facts (caption_flag)"))

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
        threshold = self.parameterAsDouble(parameters, self.THRESHOLD, context)
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
            if not model.can_detect:
                feedback.pushWarning(f"the model {model.name!r} cannot detect change: the facts come from the pixels "
                                     "alone (mean_prob, max_prob and objects are NULL)")
            beam_size = beam_size or model.default_beam_size
            with raster_pair.AlignedPair(before.source(), after.source(), bands=model.input_spec.bands) as pair:
                for line in pair.report.lines():
                    feedback.pushInfo(line)
                features, geoms = self._read_regions(source, before.crs(), pair, context, feedback)
                feedback.pushInfo(f"grounding and captioning {sum(g is not None for g in geoms)} of "
                                  f"{len(features)} regions")
                areas = captioning.caption_areas(pair, model, geoms, beam_size, control.stage(0.1, 0.95), threshold)
            control.check()
        outside = sum(1 for f, a in zip(features, areas) if f.hasGeometry() and a is None)
        if outside:
            feedback.pushWarning(f"{outside} region(s) lie outside the rasters' common footprint: no caption")

        # The sink is created only now, so a failed or cancelled run leaves no output behind.
        fields = QgsFields(source.fields())
        index = {}
        for name, kind in captioning.AREA_FIELDS.items():
            index[name] = fields.lookupField(name)
            if index[name] < 0:
                fields.append(QgsField(name, _QVARIANT[kind]))
                index[name] = fields.count() - 1
        replaced = [name for name in captioning.AREA_FIELDS if index[name] < source.fields().count()]
        if replaced:
            feedback.pushWarning(f"the input already has the field(s) {', '.join(replaced)}; their values are "
                                 "replaced")
        sink, dest_id = self.parameterAsSink(parameters, self.OUTPUT, context, fields, source.wkbType(),
                                             source.sourceCrs())
        if sink is None:
            raise QgsProcessingException(self.invalidSinkError(parameters, self.OUTPUT))
        flagged = 0
        for feature, area in zip(features, areas):
            out = QgsFeature(fields)
            if feature.hasGeometry():
                out.setGeometry(feature.geometry())
            attrs = list(feature.attributes())
            attrs += [None] * (fields.count() - len(attrs))
            record = area.record() if area is not None else dict.fromkeys(index)
            for name, value in record.items():
                attrs[index[name]] = value
            flagged += bool(area is not None and area.grounded.caption_flag)
            out.setAttributes(attrs)
            if not sink.addFeature(out, QgsFeatureSink.FastInsert):
                raise QgsProcessingException(self.writeFeatureError(sink, parameters, self.OUTPUT))
        if flagged:
            feedback.pushWarning(f"{flagged} region caption(s) from the decoder contradict the region's facts: see "
                                 "the caption_flag field")
        feedback.setProgress(100.0)
        return {self.OUTPUT: dest_id, self.FLAGGED_COUNT: flagged}

    @staticmethod
    def _read_regions(source, grid_crs: QgsCoordinateReferenceSystem, pair, context, feedback):
        """The features, and for each its polygon on the pair's grid as a shapely geometry (None: no geometry, or
        not transformable into the grid's CRS)."""
        from shapely import wkb

        if not grid_crs.isValid():
            grid_crs = QgsCoordinateReferenceSystem.fromWkt(pair.grid.crs.to_wkt())
        src_crs = source.sourceCrs()
        transform = (QgsCoordinateTransform(src_crs, grid_crs, context.transformContext())
                     if src_crs.isValid() and src_crs != grid_crs else None)
        total = max(source.featureCount(), 1)
        features, geoms = [], []
        for i, feature in enumerate(source.getFeatures()):
            if feedback.isCanceled():
                break
            features.append(QgsFeature(feature))
            geom = feature.geometry()
            shape = None
            if geom is not None and not geom.isNull() and not geom.isEmpty():
                geom = QgsGeometry(geom)
                try:
                    if transform is not None:
                        geom.transform(transform)
                    geom.convertToStraightSegment()  # curves, and Z / M values, are not what shapely reads
                    flat = geom.constGet().clone()
                    flat.dropZValue()
                    flat.dropMValue()
                    shape = wkb.loads(bytes(QgsGeometry(flat).asWkb()))
                except QgsCsException:
                    shape = None
            geoms.append(shape)
            feedback.setProgress(10.0 * (i + 1) / total)
        return features, geoms
