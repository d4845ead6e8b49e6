"""``changescribe:detectchangesbatch`` ("Detect changes in many pairs"): ``changescribe batch`` from the toolbox.

The batch runs its dask workers as processes of a Python interpreter, which QGIS's own executable is not, so the
algorithm runs the command line (``python -m changescribe batch ... --json``) in a Python: the one set in the
dock's *Settings → Run in*, else this Python when it is one (tests, a standalone script), else the interpreter that
QGIS's Python is built on. It follows the command's JSON lines (one per finished unit) with the progress bar, stops
it (SIGTERM) on cancel, and turns its one-line error into a QgsProcessingException. QGIS itself never imports
dask: without it in that Python, the run ends with the command's one line saying how to install it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

from qgis.core import (
    QgsProcessing,
    QgsProcessingException,
    QgsProcessingOutputNumber,
    QgsProcessingParameterBoolean,
    QgsProcessingParameterFile,
    QgsProcessingParameterNumber,
    QgsProcessingParameterString,
    QgsProcessingParameterVectorDestination,
)

from .processing_support import (
    ChangeScribeAlgorithm,
    add_model_parameters,
    check_choices,
    device_choice,
    model_choice,
)
from .worker_client import PLUGIN_PARENT, worker_environment


def batch_python() -> str:
    """The Python that runs the batch: the dock's worker Python, else this one if it is a Python, else QGIS's base."""
    from .environment import default_base_python
    from .settings import Settings

    chosen = Settings().get("python")
    if chosen and Path(chosen).is_file():
        return chosen
    if Path(sys.executable).name.lower().startswith("python"):
        return sys.executable
    return default_base_python()


class DetectChangesBatchAlgorithm(ChangeScribeAlgorithm):
    MANIFEST, BEFORE_MOSAIC, AFTER_MOSAIC, AREAS = "MANIFEST", "BEFORE_MOSAIC", "AFTER_MOSAIC", "AREAS"
    THRESHOLD, MIN_AREA, CAPTIONS = "THRESHOLD", "MIN_AREA", "CAPTIONS"
    WORKERS, SCHEDULER, CHUNK_SIZE, OVERWRITE = "WORKERS", "SCHEDULER", "CHUNK_SIZE", "OVERWRITE"
    OUTPUT, REGION_COUNT, FAILED_UNITS = "OUTPUT", "REGION_COUNT", "FAILED_UNITS"

    def name(self) -> str:
        return "detectchangesbatch"

    def displayName(self) -> str:  # noqa: N802
        return "Detect changes in many pairs"

    def tags(self) -> list[str]:
        return ["change", "batch", "dask", "cluster", "mosaic", "manifest", "many pairs", "distributed"]

    def shortHelpString(self) -> str:  # noqa: N802
        return ("Runs the Detect and caption changes pipeline on many before/after pairs, or on one pair too large "
                "for one machine cut into chunks, on dask.distributed: a local cluster of WORKERS processes, or the "
                "cluster whose scheduler address is SCHEDULER. Give a MANIFEST (CSV or GeoPackage with before and "
                "after columns, optional name and area) or two mosaics (e.g. VRTs) with an optional layer of AREAS. "
                "All regions go into one GeoPackage (column pair), with the table changescribe_units listing every "
                "unit and its status. Finished units are kept beside the output (OUTPUT.units), so running again "
                "resumes; a failed unit is reported and the others are kept. Needs dask[distributed] in the Python "
                "that runs it (the dock's Settings → Run in).")

    def initAlgorithm(self, config=None) -> None:  # noqa: N802
        add = self.add_described
        add(QgsProcessingParameterFile(self.MANIFEST, "Manifest (CSV or GeoPackage of pairs)",
                                       behavior=QgsProcessingParameterFile.File, optional=True,
                                       fileFilter="Manifest (*.csv *.gpkg *.txt)"),
            "A CSV or GeoPackage with the columns before and after (raster paths, relative to the manifest's folder "
            "or absolute), optionally name and, in a CSV, area (WKT) with area_crs. Leave empty to use two mosaics.")
        add(QgsProcessingParameterFile(self.BEFORE_MOSAIC, "Before mosaic (instead of a manifest)",
                                       behavior=QgsProcessingParameterFile.File, optional=True),
            "The earlier mosaic, e.g. a VRT: with the after mosaic, one pair (cut into chunks when large).")
        add(QgsProcessingParameterFile(self.AFTER_MOSAIC, "After mosaic (instead of a manifest)",
                                       behavior=QgsProcessingParameterFile.File, optional=True),
            "The later mosaic of the same place.")
        add(QgsProcessingParameterFile(self.AREAS, "Area polygons (with the mosaics)",
                                       behavior=QgsProcessingParameterFile.File, optional=True,
                                       fileFilter="Vector files (*.gpkg *.shp *.geojson)"),
            "With the two mosaics: one pair per polygon, limited to it. Empty: the whole overlap.")
        add_model_parameters(self)
        add(QgsProcessingParameterNumber(self.THRESHOLD, "Change probability threshold",
                                         QgsProcessingParameterNumber.Double, 0.5, minValue=0.01, maxValue=0.99),
            "Pixels whose change probability is at or above this value count as change (0.01–0.99).")
        add(QgsProcessingParameterNumber(self.MIN_AREA, "Minimum region area (m²)",
                                         QgsProcessingParameterNumber.Double, 0.0, minValue=0.0),
            "Change regions smaller than this many square metres are dropped.")
        add(QgsProcessingParameterBoolean(self.CAPTIONS, "Caption each region", True),
            "With a captioning model, describe each region in a sentence. Off: regions only (faster).")
        add(QgsProcessingParameterNumber(self.WORKERS, "Worker processes (0 = one per core)",
                                         QgsProcessingParameterNumber.Integer, 0, minValue=0),
            "Processes of the local dask cluster; each runs PyTorch on its share of the cores.", advanced=True)
        add(QgsProcessingParameterString(self.SCHEDULER, "Dask scheduler address (empty = a local cluster)",
                                         optional=True),
            "e.g. tcp://10.0.0.5:8786: run on that cluster instead. Every worker must see the same file paths.",
            advanced=True)
        add(QgsProcessingParameterNumber(self.CHUNK_SIZE, "Chunk size in pixels",
                                         QgsProcessingParameterNumber.Integer, 4096, minValue=256),
            "A pair larger than this a side runs in chunks of this size (rounded down to a multiple of 256).",
            advanced=True)
        add(QgsProcessingParameterBoolean(self.OVERWRITE, "Replace existing files ChangeScribe did not write", False),
            "Off: an output path that holds someone else's file stops the run. An input is never overwritten.",
            advanced=True)
        add(QgsProcessingParameterVectorDestination(self.OUTPUT, "Change regions of all pairs",
                                                    QgsProcessing.TypeVectorPolygon),
            "GeoPackage (.gpkg): layer change_regions (with the pair each region comes from) and the table "
            "changescribe_units.")
        self.addOutput(QgsProcessingOutputNumber(self.REGION_COUNT, "Number of change regions"))
        self.addOutput(QgsProcessingOutputNumber(self.FAILED_UNITS, "Number of failed units"))

    def checkParameterValues(self, parameters, context):  # noqa: N802
        ok, message, normalised = check_choices(self, parameters, context)
        if not ok:
            return ok, message
        return super().checkParameterValues(normalised, context)

    def command(self, parameters, context) -> list[str]:
        """The ``changescribe batch`` arguments these parameters ask for."""
        manifest = self.parameterAsFile(parameters, self.MANIFEST, context)
        mosaics = [self.parameterAsFile(parameters, n, context) for n in (self.BEFORE_MOSAIC, self.AFTER_MOSAIC)]
        areas = self.parameterAsFile(parameters, self.AREAS, context)
        if manifest and any(mosaics):
            raise QgsProcessingException("give either a manifest or two mosaics, not both")
        if not manifest and not all(mosaics):
            raise QgsProcessingException("give a manifest, or both a before and an after mosaic")
        args = [manifest] if manifest else mosaics
        if areas:
            args += ["--areas", areas]
        output = self.parameterAsOutputLayer(parameters, self.OUTPUT, context)
        args += ["-o", output, "--model", model_choice(self, parameters, context),
                 "--device", device_choice(self, parameters, context),
                 "--threshold", str(self.parameterAsDouble(parameters, self.THRESHOLD, context)),
                 "--min-area", str(self.parameterAsDouble(parameters, self.MIN_AREA, context)),
                 "--chunk-size", str(self.parameterAsInt(parameters, self.CHUNK_SIZE, context)), "--json"]
        workers = self.parameterAsInt(parameters, self.WORKERS, context)
        if workers:
            args += ["--workers", str(workers)]
        scheduler = (self.parameterAsString(parameters, self.SCHEDULER, context) or "").strip()
        if scheduler:
            args += ["--scheduler", scheduler]
        if not self.parameterAsBool(parameters, self.CAPTIONS, context):
            args.append("--no-captions")
        if self.parameterAsBool(parameters, self.OVERWRITE, context):
            args.append("--overwrite")
        return args

    def processAlgorithm(self, parameters, context, feedback):  # noqa: N802
        args = self.command(parameters, context)
        python = batch_python()
        feedback.pushInfo(f"running in {python}: changescribe batch {' '.join(args)}")
        env = worker_environment(PLUGIN_PARENT)
        try:
            proc = subprocess.Popen([python, "-m", "changescribe", "batch", *args], stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True, encoding="utf-8", errors="replace", env=env,
                                    cwd=str(Path(args[args.index("-o") + 1]).parent))
        except OSError as exc:
            raise QgsProcessingException(f"cannot start {python}: {exc.strerror or exc}") from None
        stderr: list[str] = []
        reader = threading.Thread(target=lambda: stderr.extend(proc.stderr), daemon=True)
        reader.start()
        watcher = threading.Thread(target=_stop_on_cancel, args=(proc, feedback), daemon=True)
        watcher.start()
        result: dict = {}
        for line in proc.stdout:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if event.get("event") == "unit":
                feedback.setProgress(100.0 * event["done"] / max(event["total"], 1))
                feedback.setProgressText(f"unit {event['done']}/{event['total']}: {event['unit']} {event['status']}")
                if event["status"] != "done":
                    feedback.reportError(f"unit {event['unit']} failed: {event.get('error')}")
            elif event.get("event") == "log":
                feedback.pushInfo(event.get("message", ""))
            elif event.get("event") == "result":
                result = event
        code = proc.wait()
        reader.join(5)
        proc.stdout.close()
        proc.stderr.close()
        if feedback.isCanceled():
            raise QgsProcessingException("cancelled by the user; finished units are kept and a re-run resumes")
        last = next((ln.strip() for ln in reversed(stderr) if ln.strip()), "")
        if code != 0 and not (code == 2 and result.get("output")):
            message = last.removeprefix("changescribe: error: ") or f"the batch stopped with exit code {code}"
            raise QgsProcessingException(message)
        if code != 0:
            feedback.reportError(last.removeprefix("changescribe: error: "))
        feedback.pushInfo(result.get("summary", ""))
        output = result["output"]
        return {self.OUTPUT: f"{output}|layername=change_regions", self.REGION_COUNT: result.get("regions", 0),
                self.FAILED_UNITS: result.get("failed", 0)}


def _stop_on_cancel(proc: subprocess.Popen, feedback) -> None:
    """SIGTERM the batch when the user cancels: it closes its cluster; finished units stay for a re-run."""
    while proc.poll() is None:
        if feedback.isCanceled():
            proc.terminate()
            return
        threading.Event().wait(0.5)

