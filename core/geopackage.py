"""Writing the result GeoPackage atomically: a half-written file must never appear at the user's path.

The regions go to a layer ``change_regions``; the scene caption and the run's metadata go to an attribute
(non-spatial) table ``changescribe_runs`` in the same file, registered in ``gpkg_contents`` as the
GeoPackage standard asks, so QGIS lists it and a later tool can read what produced the layer.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import geopandas as gpd

from .atomic import atomic_path

REGIONS_LAYER = "change_regions"
RUNS_TABLE = "changescribe_runs"

_FIELD_TYPES = {"int64": "int", "float64": "float", "object": "str", "bool": "bool", "int32": "int"}


def _schema(gdf: gpd.GeoDataFrame) -> dict:
    props = {}
    for col, dtype in gdf.drop(columns=gdf.geometry.name).dtypes.items():
        props[col] = _FIELD_TYPES.get(str(dtype), "str")
    return {"geometry": "Polygon", "properties": props}


def write_result(path: str | Path, regions: gpd.GeoDataFrame, run: dict) -> Path:
    """Write regions + one run record to ``path`` via a temporary file in the same folder, then rename."""
    path = Path(path)
    if path.suffix.lower() != ".gpkg":
        raise ValueError(f"output must be a .gpkg file, got {path.name}")
    regions = regions.explode(index_parts=False).reset_index(drop=True) if len(regions) else regions
    with atomic_path(path, ".tmp.gpkg") as tmp:
        regions.to_file(tmp, layer=REGIONS_LAYER, driver="GPKG", schema=_schema(regions))
        _write_run_table(tmp, run)
    return path


def _write_run_table(gpkg: str, run: dict) -> None:
    con = sqlite3.connect(gpkg)
    try:
        with con:
            con.execute(f"CREATE TABLE IF NOT EXISTS {RUNS_TABLE} (fid INTEGER PRIMARY KEY AUTOINCREMENT, "
                        "layer TEXT NOT NULL, created TEXT NOT NULL, scene_caption TEXT, summary TEXT, "
                        "model TEXT, model_version TEXT, metadata TEXT NOT NULL)")
            con.execute("INSERT OR REPLACE INTO gpkg_contents (table_name, data_type, identifier, description, "
                        "last_change) VALUES (?, 'attributes', ?, ?, strftime('%Y-%m-%dT%H:%M:%fZ','now'))",
                        (RUNS_TABLE, RUNS_TABLE, "ChangeScribe runs: scene caption and run metadata"))
            con.execute(f"INSERT INTO {RUNS_TABLE} (layer, created, scene_caption, summary, model, model_version, "
                        "metadata) VALUES (?, ?, ?, ?, ?, ?, ?)",
                        (REGIONS_LAYER, run.get("created", ""), run.get("scene_caption"), run.get("summary"),
                         run.get("model", {}).get("name"), run.get("model", {}).get("version"),
                         json.dumps(run, default=str)))
            # The layer's own description carries the scene caption, so any GIS shows it.
            con.execute("UPDATE gpkg_contents SET description = ? WHERE table_name = ?",
                        (run.get("scene_caption") or "", REGIONS_LAYER))
    finally:
        con.close()


def read_run(path: str | Path) -> dict:
    """The latest run record stored in a ChangeScribe GeoPackage."""
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        row = con.execute(f"SELECT metadata FROM {RUNS_TABLE} ORDER BY fid DESC LIMIT 1").fetchone()
    finally:
        con.close()
    if row is None:
        raise ValueError(f"{path} holds no ChangeScribe run")
    return json.loads(row[0])
