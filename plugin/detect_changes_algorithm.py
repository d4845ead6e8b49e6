"""``changescribe:detectchanges``: the core pipeline as a Processing algorithm (toolbox, batch, modeler,
``processing.run`` and ``qgis_process``)."""

from __future__ import annotations

from pathlib import Path

from qgis.core import (
    QgsCoordinateTransform,
    QgsFeatureRequest,
    QgsGeometry,
    QgsProcessing,
    QgsProcessingException,
    QgsProcessingOutputNumber,
    QgsProcessingOutputString,
    QgsProcessingParameterBoolean,
    QgsProcessingParameterExtent,
    QgsProcessingParameterFileDestination,
    QgsProcessingParameterNumber,
    QgsProcessingParameterRasterDestination,
    QgsProcessingParameterRasterLayer,
    QgsProcessingParameterVectorDestination,
    QgsProcessingParameterVectorLayer,
)

from ..core.api import MAX_BEAM_SIZE, Area, DetectRequest
from .processing_support import (
    ChangeScribeAlgorithm,
    add_model_parameters,
    check_choices,
    crs_string,
    device_choice,
    import_core,
    model_choice,
    model_enum,
    option_choice,
    processing_errors,
    raster_input,
    run_control,
)
from .styling import RegionsPostProcessor


class DetectChangesAlgorithm(ChangeScribeAlgorithm):
    BEFORE, AFTER, MODEL, MODEL_FILE, DEVICE = "BEFORE", "AFTER", "MODEL", "MODEL_FILE", "DEVICE"
    THRESHOLD, MIN_AREA, TILE_SIZE, OVERLAP, BATCH_SIZE = "THRESHOLD", "MIN_AREA", "TILE_SIZE", "OVERLAP", "BATCH_SIZE"
    EXTENT, MASK, CAPTIONS, BEAM_SIZE = "EXTENT", "MASK", "CAPTIONS", "BEAM_SIZE"
    FILL_NODATA, ONNXRUNTIME = "FILL_NODATA", "ONNXRUNTIME"
    OUTPUT, OUTPUT_PROBABILITY, REPORT = "OUTPUT", "OUTPUT_PROBABILITY", "REPORT"
    CAPTION, REGION_COUNT, FLAGGED_COUNT = "CAPTION", "REGION_COUNT", "FLAGGED_COUNT"
    OVERWRITE, DETECTOR, GSD = "OVERWRITE", "DETECTOR", "GSD"
    # Every DetectRequest field and the parameter(s) that set it in build_request(), and the fields it leaves alone
    # (a run started here has no cache); tests/test_api.py checks that together they are all the fields.
    REQUEST_PARAMETERS = {
        "before": BEFORE, "after": AFTER, "output": OUTPUT, "model": f"{MODEL}, {MODEL_FILE}", "detector": DETECTOR,
        "device": DEVICE, "threshold": THRESHOLD, "min_area": MIN_AREA, "tile_size": TILE_SIZE, "overlap": OVERLAP,
        "batch_size": BATCH_SIZE, "target_gsd": GSD, "area_of_interest": f"{EXTENT}, {MASK}", "captions": CAPTIONS, "fill_nodata": FILL_NODATA,
        "beam_size": BEAM_SIZE, "probability_output": OUTPUT_PROBABILITY, "overwrite": OVERWRITE,
        "onnxruntime": ONNXRUNTIME,
    }
    REQUEST_UNSET = ("reuse_probability", "cache_dir")

    def name(self) -> str:
        return "detectchanges"

    def displayName(self) -> str:  # noqa: N802
        return "Detect and caption changes"

    def tags(self) -> list[str]:
        return ["change", "detection", "caption", "before", "after", "bi-temporal", "remote sensing", "pix4cap"]

    def shortHelpString(self) -> str:  # noqa: N802
        return ("Compares a BEFORE and an AFTER raster of the same place. The AFTER raster is reprojected and "
                "resampled onto the BEFORE raster's grid, both are clipped to their common footprint (and to the "
                "optional EXTENT and MASK polygons), and a change model runs tile by tile (overlapping tiles are "
                "blended, so no seams). Pixels whose change probability reaches THRESHOLD become polygons; "
                "regions smaller than MIN_AREA (m²) are dropped. Each region gets its area, mean and maximum "
                "change probability and, with a captioning model, a sentence saying what changed; the scene "
                "caption is returned as CAPTION and stored in the GeoPackage. Where either raster has no data "
                "(its NoData value, alpha band or mask, and by default black or white fill along the border of a "
                "raster that declares none), no change is reported. Optionally writes the change probability raster and a one-file HTML report "
                "with before / after / change thumbnails and all captions. Nothing is written unless the whole "
                "run succeeds.")

    def initAlgorithm(self, config=None) -> None:  # noqa: N802
        add = self.add_described

        add(QgsProcessingParameterRasterLayer(self.BEFORE, "Before (earlier) raster"),
            "The earlier image. Its CRS and pixel grid are the grid of the whole run and of the change regions. "
            "Any GDAL raster with a CRS and a north-up geotransform; alpha and no-data pixels are masked.")
        add(QgsProcessingParameterRasterLayer(self.AFTER, "After (later) raster"),
            "The later image of the same place; reprojected and resampled onto the before raster's grid if needed.")
        add_model_parameters(self)
        add(QgsProcessingParameterNumber(self.THRESHOLD, "Change probability threshold",
                                         QgsProcessingParameterNumber.Double, 0.5, minValue=0.01, maxValue=0.99),
            "Pixels whose change probability is at or above this value count as change (0.01–0.99).")
        add(QgsProcessingParameterNumber(self.MIN_AREA, "Minimum region area (m²)",
                                         QgsProcessingParameterNumber.Double, 0.0, minValue=0.0),
            "Change regions smaller than this many square metres are dropped (geodesic in geographic CRSs).")
        add(QgsProcessingParameterNumber(self.TILE_SIZE, "Tile size in pixels (0 = the model's)",
                                         QgsProcessingParameterNumber.Integer, 0, minValue=0),
            "Side of the square tiles the model sees. 0 uses the tile size the model was trained with.")
        add(QgsProcessingParameterNumber(self.OVERLAP, "Tile overlap in pixels (-1 = tile/8)",
                                         QgsProcessingParameterNumber.Integer, -1, minValue=-1),
            "Pixels shared by neighbouring tiles; overlaps are blended so tile seams do not show. -1: an eighth "
            "of the tile size.")
        add(QgsProcessingParameterNumber(self.GSD, "Resample to this GSD in metres (0 = the before raster's, "
                                         "-1 = the model's)", QgsProcessingParameterNumber.Double, 0.0, minValue=-1.0),
            "Both rasters are resampled to this ground sample distance before the model runs. 0 keeps the before "
            "raster's resolution; -1 uses the GSD the model was trained at (from its card).", advanced=True)
        add(QgsProcessingParameterExtent(self.EXTENT, "Limit to extent", optional=True),
            "Only this rectangle is analysed. An extent without a CRS is taken to be in the before raster's CRS.")
        add(QgsProcessingParameterVectorLayer(self.MASK, "Limit to polygons (mask layer)",
                                              [QgsProcessing.TypeVectorPolygon], optional=True),
            "Only pixels inside the union of this layer's polygons are analysed: its selected features if it has a "
            "selection, else all of them. Combined with the extent when both are given.")
        add(QgsProcessingParameterNumber(self.BATCH_SIZE, "Tiles per batch",
                                         QgsProcessingParameterNumber.Integer, 8, minValue=1),
            "Tiles the model processes at once; lower it if the GPU runs out of memory.", advanced=True)
        add(model_enum(self.DETECTOR, "Change detector (empty = the model's own)", optional=True),
            "The installed model that makes the change mask instead of the model's own change head or its card's "
            "pairing ('pair_with'); the captions still come from the model. Empty: the model's own.", advanced=True)
        add(QgsProcessingParameterBoolean(self.FILL_NODATA, "Border fill is no data", True),
            "In a raster that declares no NoData value, constant black (or white) fill touching its border, as in "
            "mosaics and warped exports, is no data and never change. Off: such fill is read as image.",
            advanced=True)
        add(QgsProcessingParameterBoolean(self.CAPTIONS, "Caption the scene and each region", True),
            "With a captioning model, describe the scene and each region in a sentence. Off: regions only (faster).",
            advanced=True)
        add(QgsProcessingParameterNumber(self.BEAM_SIZE, "Caption beam size (0 = the model's own)",
                                         QgsProcessingParameterNumber.Integer, 0, minValue=0,
                                         maxValue=MAX_BEAM_SIZE),
            "Beam search width for the captions: 0 uses the model's own setting from its card (e.g. 3 for SEN, "
            "greedy for the shipped model); 1 is greedy decoding (fastest); 3 is the papers' setting.",
            advanced=True)
        add(QgsProcessingParameterBoolean(self.ONNXRUNTIME, "ONNX Runtime on the CPU (when installed)", True),
            "On the CPU, the change encoder and mask head run on ONNX Runtime when the onnxruntime package is "
            "installed (several times faster there; the same probabilities within 1e-4). Off: the whole model runs on PyTorch.",
            advanced=True)
        add(QgsProcessingParameterBoolean(self.OVERWRITE, "Replace existing files ChangeScribe did not write", False),
            "Off (the default): an output path that holds a file ChangeScribe did not write (its GeoPackage, "
            "probability raster or report) stops the run, so nobody's data is replaced by accident. An input is "
            "never overwritten, whatever this says.", advanced=True)
        add(QgsProcessingParameterVectorDestination(self.OUTPUT, "Change regions", QgsProcessing.TypeVectorPolygon),
            "GeoPackage (.gpkg) to write: layer change_regions (region_id, area_m2, mean_prob, max_prob, caption, "
            "the run's sources, model and threshold, then each region's facts: shape, compactness, elongation, "
            "orientation_deg, position, objects, brightness_change, greenness_change, texture_change, "
            "greenness_index; its change_type and type_confidence; the decoder's sentence model_caption and "
            "caption_flag, why that sentence contradicts the facts) plus the table changescribe_runs with the run's "
            "metadata.")
        add(QgsProcessingParameterRasterDestination(self.OUTPUT_PROBABILITY, "Change probability", optional=True,
                                                    createByDefault=False),
            "Optional float32 GeoTIFF of the per-pixel change probability, on the before raster's grid.")
        add(QgsProcessingParameterFileDestination(self.REPORT, "HTML report", "HTML files (*.html *.htm)",
                                                  optional=True, createByDefault=False),
            "Optional single-file HTML report: thumbnails of the before and after images and of the change regions "
            "over the after image, the scene caption and a table of the regions with their captions.")
        self.addOutput(QgsProcessingOutputString(self.CAPTION, "Scene caption"))
        self.addOutput(QgsProcessingOutputNumber(self.REGION_COUNT, "Number of change regions"))
        self.addOutput(QgsProcessingOutputNumber(self.FLAGGED_COUNT, "Number of regions whose decoder caption "
                                                                     "contradicts their facts (caption_flag)"))

    def checkParameterValues(self, parameters, context):  # noqa: N802
        ok, message, normalised = check_choices(self, parameters, context)
        if not ok:
            return ok, message
        return super().checkParameterValues(normalised, context)

    def build_request(self, parameters, context, feedback, before, after) -> DetectRequest:
        """The run these parameters ask for (:data:`REQUEST_PARAMETERS`); an option out of range is a one-line
        QgsProcessingException."""
        overlap = self.parameterAsInt(parameters, self.OVERLAP, context)
        gsd = self.parameterAsDouble(parameters, self.GSD, context)
        with processing_errors():
            return DetectRequest(
                before=before.source(), after=after.source(),
                output=self.parameterAsOutputLayer(parameters, self.OUTPUT, context),
                model=model_choice(self, parameters, context),
                detector=option_choice(self, parameters, self.DETECTOR, context),
                device=device_choice(self, parameters, context),
                threshold=self.parameterAsDouble(parameters, self.THRESHOLD, context),
                min_area=self.parameterAsDouble(parameters, self.MIN_AREA, context),
                tile_size=self.parameterAsInt(parameters, self.TILE_SIZE, context) or None,
                overlap=None if overlap < 0 else overlap,
                batch_size=self.parameterAsInt(parameters, self.BATCH_SIZE, context),
                target_gsd="model" if gsd < 0 else (gsd or None),
                area_of_interest=self.area_of_interest(parameters, context, before, feedback),
                captions=self.parameterAsBool(parameters, self.CAPTIONS, context),
                fill_nodata=self.parameterAsBool(parameters, self.FILL_NODATA, context),
                beam_size=self.parameterAsInt(parameters, self.BEAM_SIZE, context) or None,
                probability_output=self.parameterAsOutputLayer(parameters, self.OUTPUT_PROBABILITY, context) or None,
                overwrite=self.parameterAsBool(parameters, self.OVERWRITE, context),
                onnxruntime=self.parameterAsBool(parameters, self.ONNXRUNTIME, context))

    def processAlgorithm(self, parameters, context, feedback):  # noqa: N802
        # the pipeline too, so a missing library is reported with how to install it before anything else
        _, run_mod, run_control_mod, report_mod, outputs = import_core("pipeline", "run", "run_control", "report",
                                                                       "outputs")
        before = raster_input(self, parameters, self.BEFORE, context, "before")
        after = raster_input(self, parameters, self.AFTER, context, "after")
        report = self.parameterAsFileOutput(parameters, self.REPORT, context) or None
        if report and Path(report).suffix.lower() not in (".html", ".htm"):
            raise QgsProcessingException(f"the report must be an HTML file (.html), not {report}")
        request = self.build_request(parameters, context, feedback, before, after)
        control = run_control(feedback, run_control_mod.RunControl)
        with processing_errors():
            # the report is written after the run: its path is checked now, with the run's other outputs
            outputs.check_outputs([before.source(), after.source()], {"report": report}, overwrite=request.overwrite)
            result = run_mod.run_request(request, control, on_note=feedback.pushWarning)
            area = request.aoi()
            if report:
                feedback.setProgressText("writing the report")
                try:
                    control.check()
                    report_mod.write_report(report, before.source(), after.source(), result,
                                            bounds=area.geometry.bounds if area is not None else None)
                except BaseException as exc:
                    # All or nothing, like the pipeline itself: a failed report takes this run's outputs with it.
                    for path in (result.output, result.probability):
                        if path is not None:
                            Path(path).unlink(missing_ok=True)
                    if isinstance(exc, OSError):
                        raise QgsProcessingException(f"cannot write the report {report}: {exc}") from None
                    raise
        flagged = result.flagged
        feedback.pushInfo(f"{len(result.regions)} change regions; scene caption: {result.scene_caption}")
        if flagged:
            feedback.pushWarning(f"{flagged} region caption(s) from the decoder contradict the region's facts: see "
                                 "the caption_flag field")
        uri = f"{result.output}|layername=change_regions"
        self._load_styled(context, request.output, uri, result.scene_caption)
        return {self.OUTPUT: uri,
                self.OUTPUT_PROBABILITY: str(result.probability) if result.probability else None,
                self.REPORT: report,
                self.CAPTION: result.scene_caption, self.REGION_COUNT: len(result.regions),
                self.FLAGGED_COUNT: flagged}

    def area_of_interest(self, parameters, context, before, feedback) -> Area | None:
        """EXTENT and MASK as one :class:`Area` in the before raster's CRS, or None when neither is set."""
        crs = before.crs()
        geometry = None
        if parameters.get(self.EXTENT) not in (None, ""):
            extent = self.parameterAsExtent(parameters, self.EXTENT, context)
            if not extent.isNull():
                # Transformed (densified) into the before CRS; an extent without a CRS is taken as already in it.
                geometry = self.parameterAsExtentGeometry(parameters, self.EXTENT, context, crs)
        mask = self.parameterAsVectorLayer(parameters, self.MASK, context)
        if mask is not None:
            mask_geometry = self.mask_geometry(mask, crs, context, feedback)
            geometry = mask_geometry if geometry is None else geometry.intersection(mask_geometry)
            if geometry.isEmpty():
                raise QgsProcessingException("the extent and the mask polygons do not overlap")
        if geometry is None:
            return None
        if geometry.isEmpty():
            raise QgsProcessingException("the extent is empty")
        return Area(geometry.asWkt(), crs_string(crs))

    @staticmethod
    def mask_geometry(layer, crs, context, feedback) -> QgsGeometry:
        """The union of the layer's selected polygons (all of them without a selection) in ``crs``."""
        selected = layer.selectedFeatureCount() > 0
        request = QgsFeatureRequest().setNoAttributes()
        features = layer.getSelectedFeatures(request) if selected else layer.getFeatures(request)
        parts = []
        for feature in features:
            if feedback.isCanceled():
                raise QgsProcessingException("cancelled by the user; nothing was written")
            geom = feature.geometry()
            if geom is not None and not geom.isNull() and not geom.isEmpty():
                parts.append(geom.makeValid() if not geom.isGeosValid() else geom)
        what = "selected features" if selected else "features"
        if not parts:
            raise QgsProcessingException(f"the mask layer {layer.name()!r} has no polygon among its {what}")
        union = QgsGeometry.unaryUnion(parts)
        if layer.crs().isValid() and crs.isValid() and layer.crs() != crs:
            union.transform(QgsCoordinateTransform(layer.crs(), crs, context.transformContext()))
        feedback.pushInfo(f"limited to the union of {len(parts)} {what} of {layer.name()}")
        return union

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
