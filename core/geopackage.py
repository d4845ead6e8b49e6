"""The result GeoPackage: change regions appended as they are found, and a record of the run.

The regions go to a layer ``change_regions``, written batch by batch (each batch one transaction), so a run
never holds all its regions; the scene caption and the run's metadata go to an attribute (non-spatial) table
``changescribe_runs`` in the same file, registered in ``gpkg_contents`` as the GeoPackage standard asks, so QGIS
lists it and a later tool can read what produced the layer. The pipeline writes into a temporary file that is
renamed into place only when the run succeeds (:mod:`.atomic`).
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import fiona
import geopandas as gpd
import numpy as np
from pyproj import CRS
from shapely.geometry import mapping

from .grounding import FACT_FIELDS, GroundedRegion, judgement_record

# SQL below names these tables in f-strings (bandit B608 is silenced there): constants, never user text; values are
# bound parameters.
REGIONS_LAYER = "change_regions"
RUNS_TABLE = "changescribe_runs"

# The regions layer's fields, in order: what each region gets from the polygon stage, its caption (and how many
# regions share the crop its decoder caption was made from: 1 = the region's own, 0 = no caption), the run it came
# from (the same for every region of a run), then its facts, change type, the decoder's sentence and the flag
# (:data:`.grounding.FACT_FIELDS`, added last so readers of older layers find every field where it was).
REGION_FIELDS = {"region_id": "int", "area_m2": "float", "mean_prob": "float", "max_prob": "float",
                 "caption": "str", "caption_regions": "int", "before": "str", "after": "str", "model_name": "str", "model_version": "str",
                 "threshold": "float", "created": "str", **FACT_FIELDS}


@dataclass(frozen=True)
class RegionLayer:
    """The change regions of a run, on disk: counted and summed while written, read back only on request."""

    path: Path
    crs: CRS
    count: int
    total_area_m2: float

    def __len__(self) -> int:
        return self.count

    def read(self, rows: slice | None = None) -> gpd.GeoDataFrame:
        """The regions (or a slice of them, in region order) as a frame; whole only for small results."""
        return gpd.read_file(self.path, layer=REGIONS_LAYER, rows=rows)

    def batches(self, size: int = 2000) -> Iterator[gpd.GeoDataFrame]:
        """All regions, ``size`` at a time: what a consumer of a large result should iterate."""
        for start in range(0, self.count, size):
            yield self.read(slice(start, start + size))

    def largest(self, n: int) -> gpd.GeoDataFrame:
        """The ``n`` largest regions, largest first (ties by region_id): a table of a large result."""
        con = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True)
        try:
            fids = [r[0] for r in con.execute(f"SELECT fid FROM {REGIONS_LAYER} ORDER BY area_m2 DESC, region_id "  # nosec B608
                                              "LIMIT ?", (int(n),))]
        finally:
            con.close()
        if not fids:
            return self.read(slice(0, 0))
        frame = gpd.read_file(self.path, layer=REGIONS_LAYER, where=f"fid IN ({','.join(map(str, fids))})")
        return frame.sort_values(["area_m2", "region_id"], ascending=[False, True], kind="stable",
                                 ignore_index=True)

    def flagged(self, n: int) -> tuple[int, list[tuple[int, str, str]]]:
        """(how many regions have a ``caption_flag``, the first ``n`` of them by region_id as (region_id, flag,
        decoder caption)); (0, []) for a layer written before flags existed."""
        con = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True)
        try:
            where = "FROM " + REGIONS_LAYER + " WHERE caption_flag IS NOT NULL AND caption_flag <> ''"
            total = con.execute("SELECT count(*) " + where).fetchone()[0]  # nosec B608
            rows = con.execute("SELECT region_id, caption_flag, coalesce(model_caption, '') " + where  # nosec B608
                               + " ORDER BY region_id LIMIT ?", (int(n),)).fetchall()
        except sqlite3.OperationalError:  # no such column: an older layer
            return 0, []
        finally:
            con.close()
        return int(total), [(int(r), str(f), str(c)) for r, f, c in rows]

    def own_folder(self, folder: Path) -> None:
        """Remove ``folder`` (a scratch copy of the regions) when this object is garbage-collected or at exit."""
        weakref.finalize(self, shutil.rmtree, folder, True)


class RegionWriter:
    """Appends batches of regions to a new GeoPackage's regions layer; every region gets ``constants`` too.
    ``extra_fields`` (name: OGR type) follow :data:`REGION_FIELDS` (a batch run's ``pair``)."""

    def __init__(self, path: str | Path, crs_wkt: str, constants: dict | None = None,
                 extra_fields: dict[str, str] | None = None):
        self.path = Path(path)
        self.crs = CRS.from_wkt(crs_wkt)
        self.fields = {**REGION_FIELDS, **(extra_fields or {})}
        self.constants = {k: v for k, v in (constants or {}).items() if k in self.fields}
        self.count = 0
        self.total_area_m2 = 0.0
        self._sink = fiona.open(self.path, "w", driver="GPKG", layer=REGIONS_LAYER, crs_wkt=crs_wkt,
                                schema={"geometry": "Polygon", "properties": dict(self.fields)})

    def append(self, regions: gpd.GeoDataFrame) -> None:
        """Write one batch in one transaction; other columns are ignored, missing fields left empty."""
        cols = [c for c in self.fields if c in regions.columns and c not in self.constants]
        values = regions[cols].to_dict("records")
        blank = dict.fromkeys(self.fields)
        records = [{"geometry": mapping(geom), "properties": {**blank, **_plain(row), **self.constants}}
                   for geom, row in zip(regions.geometry, values)]
        self._sink.writerecords(records)
        self.count += len(records)
        if "area_m2" in regions.columns:
            self.total_area_m2 += float(regions["area_m2"].sum())

    def close(self) -> None:
        self._sink.close()

    def layer(self, path: str | Path | None = None) -> RegionLayer:
        """The written layer, at ``path`` if the file was (or will be) moved there."""
        return RegionLayer(Path(path) if path is not None else self.path, self.crs, self.count,
                           self.total_area_m2)

    def __enter__(self) -> "RegionWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _plain(row: dict) -> dict:
    """numpy scalars to Python ones, which is what OGR field setters take."""
    return {k: (v.item() if isinstance(v, np.generic) else v) for k, v in row.items()}


def write_captions(gpkg: str | Path, captions: list[tuple[int, int, GroundedRegion]]) -> None:
    """Set (region_id, regions sharing its decoder caption's crop, its type, captions and flag) on the regions
    already written, in one transaction; regions not listed say they have no caption (``caption_regions`` 0).
    Through GDAL: the layer's R-tree triggers need its SQL functions."""
    from osgeo import ogr

    by_id = {rid: (n, judgement_record(g)) for rid, n, g in captions}
    ds = ogr.Open(str(gpkg), 1)
    if ds is None:
        raise OSError(f"GDAL cannot open {gpkg} for update")
    try:
        layer = ds.GetLayerByName(REGIONS_LAYER)
        ds.StartTransaction()
        for feature in layer:
            n, values = by_id.get(feature.GetField("region_id"), (0, {"caption": ""}))
            feature.SetField("caption_regions", n)
            for name, value in values.items():
                if value is None:
                    feature.SetFieldNull(name)
                else:
                    feature.SetField(name, value)
            if layer.SetFeature(feature) != 0:
                ds.RollbackTransaction()
                raise OSError(f"GDAL cannot write the captions into {gpkg}")
        ds.CommitTransaction()
    finally:
        ds = None  # noqa: F841 (closes the file)


def write_run(gpkg: str | Path, run: dict) -> None:
    """Add the run record (scene caption, metadata) to a GeoPackage that already holds the regions layer."""
    con = sqlite3.connect(gpkg)
    try:
        with con:
            con.execute(f"CREATE TABLE IF NOT EXISTS {RUNS_TABLE} (fid INTEGER PRIMARY KEY AUTOINCREMENT, "  # nosec B608
                        "layer TEXT NOT NULL, created TEXT NOT NULL, scene_caption TEXT, summary TEXT, "
                        "model TEXT, model_version TEXT, metadata TEXT NOT NULL)")
            con.execute("INSERT OR REPLACE INTO gpkg_contents (table_name, data_type, identifier, description, "
                        "last_change) VALUES (?, 'attributes', ?, ?, strftime('%Y-%m-%dT%H:%M:%fZ','now'))",
                        (RUNS_TABLE, RUNS_TABLE, "ChangeScribe runs: scene caption and run metadata"))
            con.execute(f"INSERT INTO {RUNS_TABLE} (layer, created, scene_caption, summary, model, model_version, "  # nosec B608
                        "metadata) VALUES (?, ?, ?, ?, ?, ?, ?)",
                        (REGIONS_LAYER, run.get("created", ""), run.get("scene_caption"), run.get("summary"),
                         run.get("model", {}).get("name"), run.get("model", {}).get("version"),
                         json.dumps(run, default=str)))
            # The layer's own description carries the scene caption, so any GIS shows it.
            con.execute("UPDATE gpkg_contents SET description = ? WHERE table_name = ?",
                        (run.get("scene_caption") or "", REGIONS_LAYER))
    finally:
        con.close()


def write_table(gpkg: str | Path, name: str, description: str, columns: dict[str, str], rows: list[dict]) -> None:
    """A new attribute (non-spatial) table, registered in ``gpkg_contents`` so QGIS lists it; ``columns`` maps
    each column to its SQLite type. ``name`` and the column names are constants of the caller, never user text."""
    con = sqlite3.connect(gpkg)
    try:
        with con:
            cols = ", ".join(f"{c} {t}" for c, t in columns.items())
            con.execute(f"CREATE TABLE {name} (fid INTEGER PRIMARY KEY AUTOINCREMENT, {cols})")  # nosec B608
            con.execute("INSERT OR REPLACE INTO gpkg_contents (table_name, data_type, identifier, description, "
                        "last_change) VALUES (?, 'attributes', ?, ?, strftime('%Y-%m-%dT%H:%M:%fZ','now'))",
                        (name, name, description))
            marks = ", ".join("?" for _ in columns)
            con.executemany(f"INSERT INTO {name} ({', '.join(columns)}) VALUES ({marks})",  # nosec B608
                            [tuple(row.get(c) for c in columns) for row in rows])
    finally:
        con.close()


def read_run(path: str | Path) -> dict:
    """The latest run record stored in a ChangeScribe GeoPackage."""
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        row = con.execute(f"SELECT metadata FROM {RUNS_TABLE} ORDER BY fid DESC LIMIT 1").fetchone()  # nosec B608
    finally:
        con.close()
    if row is None:
        raise ValueError(f"{path} holds no ChangeScribe run")
    return json.loads(row[0])
