"""Many pairs, or one pair too large for one machine, on ``dask.distributed``: ``changescribe batch``.

The work is cut into units, each a :class:`~.api.DetectRequest` run by the same code as ``changescribe detect``:

- a pair whose grid fits in one chunk (``chunk_size`` px a side) is one **pair** unit: a whole run
  (:func:`.run.run_request`) into a GeoPackage of its own;
- a larger pair is cut into **chunk** units on its grid. A chunk runs every tile of the whole grid that reaches it,
  the tiles across its edges included (that overlap is the chunk's halo), so its probabilities are the ones the
  whole run computes (:func:`.pipeline.predict_region`). When all its chunks are done, the pair's **regions** unit
  puts them side by side (a VRT) and runs the region, caption and GeoPackage stages of a whole run on that map
  (``reuse_probability``): polygons crossing a chunk seam are merged exactly as in a single run, because they are
  found by the single run's code on the single run's map.

Units run on a ``LocalCluster`` (one process per worker, torch threads = cores / workers) or on an existing
scheduler. Each worker keeps one loaded model (:func:`cached_model`), so a model loads once per worker, not once per
unit. Each finished unit writes its result and then a record (``<unit>.json``) into the work folder
``<OUT>.units/``; a re-run skips units whose record matches (same inputs, options and model). A unit that fails with
a ChangeScribe error (bad pixels, ...) is reported; any other failure (a worker killed, out of memory) is retried by
dask; neither stops the other units. At the end the pairs' regions go into one GeoPackage (layer ``change_regions``
with a ``pair`` column, table ``changescribe_units`` with every unit's status), written under a temporary name and
renamed into place.

Importing this module needs neither dask nor torch: the plugin lists the batch algorithm without them.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import gc
import hashlib
import json
import logging
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from .api import Area, DetectRequest
from .errors import ChangeScribeError, DependencyError, InputError
from .outputs import OutputError, check_outputs

log = logging.getLogger(__name__)

UNITS_TABLE = "changescribe_units"
WORK_SUFFIX = ".units"
WORK_MARK = "changescribe-batch.json"  # marks a work folder as ChangeScribe's: only such a folder is written into
BLOCK = 256  # chunks are whole GeoTIFF blocks of the probability map (.inference.BLOCK)
DEFAULT_CHUNK_SIZE = 4096
DEFAULT_RETRIES = 2
DASK_MISSING = ("`changescribe batch` needs dask.distributed, which this Python ({python}) cannot import: "
                "python -m pip install 'dask[distributed]'")
UNIT_COLUMNS = {"unit": "TEXT", "pair": "TEXT", "kind": "TEXT", "before": "TEXT", "after": "TEXT",
                "window": "TEXT", "status": "TEXT", "error": "TEXT", "resumed": "INTEGER", "attempts": "INTEGER",
                "seconds": "REAL", "cpu_seconds": "REAL", "tiles": "INTEGER", "regions": "INTEGER", "worker": "TEXT",
                "peak_rss_mb": "REAL", "model_loads": "INTEGER"}


@dataclass(frozen=True)
class PairSpec:
    """One manifest row: a named before/after pair, optionally limited to an area."""

    name: str
    before: str
    after: str
    area: Area | None = None


@dataclass(frozen=True)
class Unit:
    """One piece of work for a dask worker. ``request`` is the run's JSON (:class:`~.api.DetectRequest`);
    ``window`` (col, row, width, height) the chunk of a chunk unit; ``inputs`` a regions unit's chunk rasters."""

    unit_id: str
    pair: str
    kind: str  # "pair" | "chunk" | "regions"
    request: str
    output: str
    key: str
    threads: int
    window: tuple[int, int, int, int] | None = None
    inputs: tuple[str, ...] = ()

    @property
    def record(self) -> Path:
        return Path(self.output).with_suffix(".json")


@dataclass
class BatchResult:
    """What a batch produced: the GeoPackage (None when no pair finished), the units' rows and the counts."""

    output: Path | None
    units: list[dict]
    regions: int = 0
    failed: list[dict] = dataclasses.field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> str:
        done = sum(u["status"] == "done" for u in self.units)
        resumed = sum(bool(u.get("resumed")) for u in self.units)
        return (f"{done} of {len(self.units)} units done ({resumed} from an earlier run), {len(self.failed)} failed; "
                f"{self.regions} change regions")


# ---------------------------------------------------------------------------------------------------- manifest


def read_manifest(sources: list[str], areas: str | None = None) -> list[PairSpec]:
    """The pairs to run: a CSV or vector file (GeoPackage, ...) with ``before`` and ``after`` columns (optional
    ``name``; in a CSV an optional ``area`` WKT with ``area_crs``, in a vector file the feature's polygon), or two
    rasters (mosaics, e.g. VRTs) with an optional layer of area polygons, one pair per polygon. Relative paths are
    taken from the manifest's folder."""
    if len(sources) == 2:
        return _mosaic_pairs(sources[0], sources[1], areas)
    if len(sources) != 1:
        raise InputError("give a manifest (CSV or GeoPackage of before/after paths) or two mosaics (before after)")
    if areas is not None:
        raise InputError("an area layer goes with two mosaics, not with a manifest (give each row its area)")
    path = Path(sources[0])
    if not path.is_file():
        raise InputError(f"the manifest {path} does not exist")
    rows = _csv_rows(path) if path.suffix.lower() in (".csv", ".txt") else _vector_rows(path)
    pairs, names = [], set()
    for i, (row, area) in enumerate(rows, start=1):
        missing = [c for c in ("before", "after") if not str(row.get(c) or "").strip()]
        if missing:
            raise InputError(f"manifest {path.name}, row {i}: no {' and '.join(missing)} path "
                             "(the manifest needs the columns before and after)")
        name = str(row.get("name") or "").strip() or f"pair{i}"
        if name in names:
            raise InputError(f"manifest {path.name}, row {i}: the name {name!r} is used twice")
        names.add(name)
        pairs.append(PairSpec(name, _resolve(path, row["before"]), _resolve(path, row["after"]), area))
    if not pairs:
        raise InputError(f"the manifest {path} lists no pairs")
    return pairs


def _resolve(manifest: Path, value: Any) -> str:
    p = Path(str(value).strip())
    return os.path.abspath(p if p.is_absolute() else manifest.parent / p)  # workers may run elsewhere


def _csv_rows(path: Path) -> list[tuple[dict, Area | None]]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            rows = [({(k or "").strip().lower(): v for k, v in row.items()}) for row in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise InputError(f"cannot read the manifest {path}: {exc}") from None
    out = []
    for i, row in enumerate(rows, start=1):
        area = None
        if (row.get("area") or "").strip():
            if not (row.get("area_crs") or "").strip():
                raise InputError(f"manifest {path.name}, row {i}: an area needs its CRS in the column area_crs")
            area = Area(row["area"].strip(), row["area_crs"].strip())
        out.append((row, area))
    return out


def _vector_rows(path: Path) -> list[tuple[dict, Area | None]]:
    import fiona

    try:
        with fiona.open(path) as src:
            crs = src.crs_wkt
            rows = [(dict(f["properties"]), f["geometry"]) for f in src]
    except Exception as exc:  # noqa: BLE001 (fiona's errors differ between versions; one line either way)
        raise InputError(f"cannot read the manifest {path} as a CSV or vector file: {' '.join(str(exc).split())}") \
            from None
    return [({k.lower(): v for k, v in props.items()}, _area(geom, crs)) for props, geom in rows]


def _area(geometry, crs_wkt: str) -> Area | None:
    if geometry is None:
        return None
    from shapely.geometry import shape

    return Area(shape(geometry).wkt, crs_wkt)


def _mosaic_pairs(before: str, after: str, areas: str | None) -> list[PairSpec]:
    before, after = os.path.abspath(before), os.path.abspath(after)
    if areas is None:
        return [PairSpec(Path(before).stem, before, after)]
    pairs = []
    for i, (row, area) in enumerate(_vector_rows(Path(areas)), start=1):
        if area is None:
            continue
        pairs.append(PairSpec(str(row.get("name") or "").strip() or f"area{i}", before, after, area))
    if not pairs:
        raise InputError(f"the area layer {areas} has no polygon")
    if len({p.name for p in pairs}) != len(pairs):
        raise InputError(f"the area layer {areas} uses a name twice")
    return pairs


# ---------------------------------------------------------------------------------------------------- planning


def work_folder(output: str | os.PathLike) -> Path:
    """Where a batch keeps its finished units between runs: ``<OUT>.units`` beside the output."""
    out = Path(output)
    return out.with_name(out.stem + WORK_SUFFIX)


def plan_units(pairs: list[PairSpec], options: dict[str, Any], work: Path, chunk_size: int = DEFAULT_CHUNK_SIZE,
               threads: int = 1) -> list[Unit]:
    """The units of ``pairs`` with the run ``options`` (DetectRequest fields): every request is built and every pair
    opened (no pixels read) here, so a bad option or input stops the batch before anything runs."""
    from .raster_pair import validate_pair
    from .run import cache_key

    if chunk_size < BLOCK:
        raise InputError(f"the chunk size must be at least {BLOCK} px, got {chunk_size}")
    chunk = (chunk_size // BLOCK) * BLOCK
    gsd = None
    units: list[Unit] = []
    for pair in pairs:
        try:
            request = DetectRequest(before=pair.before, after=pair.after, area_of_interest=pair.area, **options)
            if request.target_gsd == "model" and gsd is None:
                gsd = _model_gsd(request.model)
            report = validate_pair(request.before, request.after,
                                   gsd if request.target_gsd == "model" else request.target_gsd, request.aoi())
        except ChangeScribeError as exc:
            raise type(exc)(f"pair {pair.name}: {exc}") from None
        base = cache_key(request)  # the sources (size and time), the model's weights, the area and the tiling
        stem = _safe(pair.name)

        def unit(kind: str, uid: str, suffix: str, window=None, inputs=()) -> Unit:
            out = str(work / f"{uid}{suffix}")
            req = dataclasses.replace(request, output=out if suffix == ".gpkg" else None)
            key = hashlib.sha256(json.dumps([base, req.to_json(), window, kind]).encode()).hexdigest()[:20]
            return Unit(uid, pair.name, kind, req.to_json(), out, key, threads, window, tuple(inputs))

        w, h = report.width, report.height
        if w <= chunk and h <= chunk:
            units.append(unit("pair", stem, ".gpkg"))
            continue
        chunks = [unit("chunk", f"{stem}.r{r // chunk}c{c // chunk}", ".tif", (c, r, min(chunk, w - c), min(chunk, h - r)))
                  for r in range(0, h, chunk) for c in range(0, w, chunk)]
        units += chunks
        units.append(unit("regions", stem, ".gpkg", inputs=[c.output for c in chunks]))
    return units


def _model_gsd(model: str) -> float | None:
    from .model_file import read_card
    from .model_loading import find_model

    return read_card(find_model(model)).get("input", {}).get("gsd")


def _safe(name: str) -> str:
    """A pair's name as a file name (its units' outputs in the work folder)."""
    keep = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in name)[:60]
    return f"{keep}-{hashlib.sha256(name.encode()).hexdigest()[:6]}"


def finished(unit: Unit) -> dict | None:
    """The record of an earlier run of this very unit (same key), if its output is still there."""
    try:
        record = json.loads(unit.record.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if record.get("key") == unit.key and record.get("status") == "done" and Path(unit.output).exists():
        return record
    return None


# ---------------------------------------------------------------------------------------------------- workers

_loads = 0  # models this worker process has loaded (reported with each unit: one per worker is the point)


@functools.lru_cache(maxsize=1)
def cached_model(name: str, device: str):
    """The worker's model: loaded once per process and kept (one at a time, so memory stays flat)."""
    global _loads
    from .device import resolve_device
    from .model_loading import load_model

    _loads += 1
    return load_model(name, resolve_device(device))


def run_unit(unit: Unit, *chunks: dict) -> dict:
    """Run one unit in a worker; returns its record (also written beside its output). A ChangeScribe error comes
    back as a failed record (running it again would fail again); anything else raises, and dask retries it."""
    started, cpu = time.perf_counter(), time.process_time()
    import torch

    if torch.get_num_threads() != unit.threads:
        torch.set_num_threads(unit.threads)
    request = DetectRequest.from_json(unit.request)
    request = dataclasses.replace(request, device=worker_device(request.device))
    record: dict[str, Any] = {"unit": unit.unit_id, "key": unit.key, "attempts": _attempt(unit),
                              "worker": f"{socket.gethostname()}:{os.getpid()}"}
    bad = [c for c in chunks if c.get("status") != "done"]
    if bad:
        return {**record, "status": "failed", "error": f"chunk {bad[0]['unit']} failed: {bad[0].get('error')}"}
    try:
        model = cached_model(request.model, request.device)
        if unit.kind == "chunk":
            from rasterio.windows import Window

            from .pipeline import predict_region

            stats = predict_region(request, Window(*unit.window), unit.output, model)
            record.update(tiles=stats.tiles, regions=None)
        else:
            from .run import run_request

            if unit.kind == "regions":
                request = dataclasses.replace(request, reuse_probability=_mosaic(unit))
            result = run_request(request, model=model)
            record.update(tiles=int(sum(c.get("tiles") or 0 for c in chunks)) or result.stats.tiles,
                          regions=len(result.regions), scene_caption=result.scene_caption)
    except ChangeScribeError as exc:
        return {**record, "status": "failed", "error": str(exc)}
    finally:
        gc.collect()
    record.update(status="done", seconds=round(time.perf_counter() - started, 3),
                  cpu_seconds=round(time.process_time() - cpu, 3), peak_rss_mb=_peak_rss_mb(),
                  model_loads=_loads)
    _write_json(unit.record, record)
    unit.record.with_suffix(".attempts").unlink(missing_ok=True)
    return record


def worker_device(device: str) -> str:
    """The device this worker runs ``device`` on: on a machine with several GPUs, ``auto`` / ``cuda`` of LocalCluster
    worker *i* is GPU *i* mod their number (else every worker would share the first); anything else as given."""
    if device not in ("auto", "cuda"):
        return device
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count < 2:
        return device
    try:
        from distributed import get_worker

        name = get_worker().name
    except (ImportError, ValueError):  # not in a dask worker
        return device
    index = name if isinstance(name, int) else int(hashlib.sha256(str(name).encode()).hexdigest(), 16)
    return f"cuda:{index % count}"


def attempts(unit: Unit) -> int:
    """How many times this unit has been started (its retries included) since its last success."""
    try:
        return int(unit.record.with_suffix(".attempts").read_text())
    except (OSError, ValueError):
        return 0


def _attempt(unit: Unit) -> int:
    n = attempts(unit) + 1
    unit.record.with_suffix(".attempts").write_text(str(n))
    return n


def _mosaic(unit: Unit) -> str:
    """The chunks of a pair as one raster (a VRT beside them): the whole run's probability map."""
    from osgeo import gdal

    vrt = str(Path(unit.output).with_suffix(".vrt"))
    ds = gdal.BuildVRT(vrt, list(unit.inputs))
    if ds is None:
        raise OSError(f"GDAL cannot mosaic the chunks of pair {unit.pair}: {gdal.GetLastErrorMsg()}")
    ds = None  # noqa: F841 (writes the VRT)
    return vrt


def _peak_rss_mb() -> float | None:
    try:
        import resource
    except ImportError:  # Windows
        return None
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def _write_json(path: Path, data: dict) -> None:
    from .atomic import atomic_path

    with atomic_path(path, ".tmp.json") as tmp:
        Path(tmp).write_text(json.dumps(data), encoding="utf-8")


# ---------------------------------------------------------------------------------------------------- driver


def run_batch(sources: list[str], output: str | os.PathLike, options: dict[str, Any], *, areas: str | None = None,
              workers: int | None = None, scheduler: str | None = None, chunk_size: int = DEFAULT_CHUNK_SIZE,
              retries: int = DEFAULT_RETRIES, overwrite: bool = False,
              on_unit: Callable[[dict, int, int], None] | None = None,
              on_log: Callable[[str], None] | None = None) -> BatchResult:
    """Run every pair of the manifest on dask and gather the regions into ``output``.

    ``options`` are the DetectRequest fields every unit shares (model, threshold, captions, ...). ``workers``
    processes of a LocalCluster (default: one per core), or the scheduler at ``scheduler``. ``on_unit(record,
    done, total)`` hears each finished unit. Raises a ChangeScribeError for bad input before anything runs.
    """
    started = time.perf_counter()
    say = on_log or (lambda text: None)
    try:
        from dask.distributed import Client, LocalCluster, as_completed
    except ImportError:
        import sys

        raise DependencyError(DASK_MISSING.format(python=sys.executable)) from None
    out = Path(output)
    if out.suffix.lower() != ".gpkg":
        raise InputError(f"the output must be a GeoPackage (.gpkg): {out}")
    if workers is not None and workers < 1:
        raise InputError(f"workers must be 1 or more, got {workers}")
    if retries < 0:
        raise InputError(f"retries must be 0 or more, got {retries}")
    bad = {"output", "probability_output", "reuse_probability", "cache_dir", "before", "after"} & set(options)
    if bad:
        raise InputError(f"a batch sets {', '.join(sorted(bad))} per unit; leave them out of the run options")
    pairs = read_manifest(sources, areas)
    inputs = [*sources, areas, *(p for pair in pairs for p in (pair.before, pair.after))]
    work = work_folder(out)
    check_outputs(inputs, {"GeoPackage": out}, overwrite=overwrite or options.get("overwrite", False))
    _check_work_folder(work, inputs)
    cores = os.cpu_count() or 1
    n_workers = workers or cores
    threads = max(1, cores // n_workers) if scheduler is None else 1
    units = plan_units(pairs, options, work, chunk_size, threads)

    def make_work_folder() -> None:  # once the cluster answers: a batch that cannot start leaves nothing behind
        work.mkdir(parents=True, exist_ok=True)
        _write_json(work / WORK_MARK, {"manifest": [str(Path(s).resolve()) for s in sources], "output": str(out)})

    rows: dict[str, dict] = {}
    done_pairs = {u.pair for u in units if u.kind in ("pair", "regions") and finished(u)}
    todo: list[Unit] = []
    for u in units:
        record = finished(u) if u.kind != "chunk" or u.pair not in done_pairs else {"status": "done"}
        if record is not None:
            rows[u.unit_id] = _row(u, {**record, "status": "done"}, resumed=True)
        else:
            todo.append(u)
    say(f"{len(units)} units for {len(pairs)} pairs: {len(units) - len(todo)} done by an earlier run, "
        f"{len(todo)} to run")
    if todo:
        _run_units(todo, rows, Client, LocalCluster, as_completed, scheduler, n_workers, retries, on_unit,
                   len(units) - len(todo), len(units), say, make_work_folder)
    for u in units:  # a pair's regions are in its GeoPackage: its chunks are no longer needed
        if u.kind == "regions" and rows[u.unit_id]["status"] == "done":
            for path in (*u.inputs, str(Path(u.output).with_suffix(".vrt"))):
                Path(path).unlink(missing_ok=True)
    ordered = [rows[u.unit_id] for u in units]
    result = BatchResult(output=None, units=ordered, failed=[r for r in ordered if r["status"] != "done"])
    finals = [u for u in units if u.kind in ("pair", "regions") and rows[u.unit_id]["status"] == "done"]
    if finals:
        result.regions = _assemble(out, finals, ordered, pairs, options)
        result.output = out
    result.seconds = round(time.perf_counter() - started, 3)
    return result


def _check_work_folder(work: Path, inputs: Iterable[str | None]) -> None:
    """The work folder is ChangeScribe's (its mark) or new; it holds no input."""
    if work.exists() and (not work.is_dir() or not (work / WORK_MARK).is_file()):
        raise OutputError(f"{work} already exists and was not made by `changescribe batch`; it is not used. Move it "
                          "or choose another output name")
    real = os.path.realpath(work) + os.sep
    for p in inputs:
        if p and os.path.realpath(p).startswith(real):
            raise OutputError(f"the input {p} lies in the batch's work folder {work}; move it")


def _run_units(todo: list[Unit], rows: dict[str, dict], Client, LocalCluster, as_completed, scheduler: str | None,
               n_workers: int, retries: int, on_unit, done: int, total: int, say: Callable[[str], None],
               on_connected: Callable[[], None]) -> None:
    """Submit the units (a regions unit after its chunks), then record each as it completes."""
    if scheduler is not None:
        cluster, address = None, scheduler
        say(f"connecting to the dask scheduler at {scheduler}")
    else:
        # One process per worker, one dask thread each: a unit's torch uses the worker's share of the cores.
        cluster = LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True, dashboard_address=":0",
                               silence_logs=logging.CRITICAL)
        address = cluster
        say(f"LocalCluster: {n_workers} worker processes, {todo[0].threads} torch thread(s) each")
    try:
        try:
            client = Client(address, timeout="20s")
        except (OSError, TimeoutError) as exc:
            raise InputError(f"cannot reach the dask scheduler at {scheduler}: {exc}") from None
        with client:
            on_connected()
            futures, by_key = {}, {}
            for u in todo:
                deps = [futures[i] for i in _chunk_ids(u, todo)] if u.kind == "regions" else []
                fut = client.submit(run_unit, u, *deps, key=f"changescribe-{u.unit_id}-{u.key}", retries=retries,
                                    pure=False)
                futures[u.unit_id] = fut
                by_key[fut.key] = u
            for fut in as_completed(list(futures.values())):
                u = by_key[fut.key]
                try:
                    record = fut.result()
                except Exception as exc:  # noqa: BLE001 (the unit failed after its retries; the others go on)
                    record = {"unit": u.unit_id, "status": "failed",
                              "error": f"{type(exc).__name__}: {' '.join(str(exc).split())}"[:500]}
                    record["attempts"] = attempts(u) or retries + 1
                rows[u.unit_id] = _row(u, record, resumed=False)
                done += 1
                if on_unit is not None:
                    on_unit(rows[u.unit_id], done, total)
                fut.release()
    finally:
        if cluster is not None:
            try:
                cluster.close(timeout=60)
            except (TimeoutError, OSError) as exc:  # the results are in; a slow worker exit is not a failure
                say(f"the LocalCluster did not close cleanly ({type(exc).__name__}); its processes are stopped")


def _chunk_ids(regions: Unit, todo: list[Unit]) -> list[str]:
    mine = set(regions.inputs)
    return [u.unit_id for u in todo if u.kind == "chunk" and u.output in mine]


def _row(u: Unit, record: dict, resumed: bool) -> dict:
    req = json.loads(u.request)
    return {"unit": u.unit_id, "pair": u.pair, "kind": u.kind, "before": req["before"], "after": req["after"],
            "window": json.dumps(u.window) if u.window else None, "status": record.get("status", "failed"),
            "error": record.get("error"), "resumed": int(resumed), "attempts": record.get("attempts", 1),
            "seconds": record.get("seconds"), "cpu_seconds": record.get("cpu_seconds"), "tiles": record.get("tiles"), "regions": record.get("regions"),
            "worker": record.get("worker"), "peak_rss_mb": record.get("peak_rss_mb"),
            "model_loads": record.get("model_loads")}


def _assemble(out: Path, finals: list[Unit], rows: list[dict], pairs: list[PairSpec], options: dict) -> int:
    """One GeoPackage from the pairs' GeoPackages (a ``pair`` column; reprojected to the first pair's CRS), the units
    table and a run record; written under a temporary name and renamed into place. Returns the region count."""
    from datetime import datetime, timezone

    from .atomic import atomic_path
    from .geopackage import RegionLayer, RegionWriter, write_run, write_table
    from .outputs import writing
    from .version import VERSION

    import geopandas as gpd
    from pyproj import CRS

    first = gpd.read_file(finals[0].output, rows=slice(0, 0))
    crs = CRS.from_user_input(first.crs)
    with writing("the GeoPackage", out), atomic_path(out, ".tmp.gpkg") as tmp:
        with RegionWriter(tmp, crs.to_wkt(), extra_fields={"pair": "str"}) as writer:
            for u in finals:
                layer = RegionLayer(Path(u.output), crs, _count(u.output), 0.0)
                for frame in layer.batches():
                    if frame.crs is not None and CRS.from_user_input(frame.crs) != crs:
                        frame = frame.to_crs(crs)
                    frame["pair"] = u.pair
                    writer.append(frame)
        write_table(tmp, UNITS_TABLE, "ChangeScribe batch: every unit and its status", UNIT_COLUMNS, rows)
        created = datetime.now(timezone.utc).isoformat(timespec="seconds")
        done = sum(r["status"] == "done" for r in rows)
        summary = f"{writer.count} change regions in {len(finals)} of {len(pairs)} pairs ({done} of {len(rows)} units done)"
        write_run(tmp, {"changescribe_version": VERSION, "created": created, "batch": True, "summary": summary,
                        "scene_caption": summary, "model": {"name": options.get("model", "default")},
                        "options": {k: (v.to_dict() if isinstance(v, Area) else v) for k, v in options.items()},
                        "pairs": [dataclasses.asdict(p) for p in pairs]})
    return writer.count


def _count(gpkg: str) -> int:
    import sqlite3

    from .geopackage import REGIONS_LAYER

    con = sqlite3.connect(f"file:{gpkg}?mode=ro", uri=True)
    try:
        return int(con.execute(f"SELECT COUNT(*) FROM {REGIONS_LAYER}").fetchone()[0])  # nosec B608
    finally:
        con.close()
