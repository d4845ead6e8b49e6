"""The analysts' annotation store: a GeoPackage layer of drawn areas with their (corrected) captions.

Analysts check and correct what the model says; their corrections must never be lost. The store is one
GeoPackage layer, ``annotations``, that the analyst creates or picks:

==================  ===========================================================================
geometry            Polygon, in the CRS chosen at creation (normally the before raster's)
caption             the caption the analyst accepted (possibly edited)
suggested_caption   what the model proposed
edited              caption differs from the suggestion
change_class        building, road, vegetation, water, other, or null
no_change           the analyst says nothing changed in the area
before_source ...   the two rasters (paths) and their dates, the model's name, the author
created, edited_at  ISO-8601 timestamps (UTC)
==================  ===========================================================================

The file is created under a temporary name and renamed into place, and it is switched to SQLite's WAL
journal mode, which persists in the file: a process killed between two edits leaves the last committed state
intact, and several readers plus one writer at a time (two QGIS projects, QGIS and an export) are safe.

Two writers at once (two QGIS windows on one project, the dock and a script): SQLite lets one write at a time and
GDAL gives up at once when the store is locked, so a save retries for up to :data:`BUSY_TIMEOUT_S` and then
raises :class:`StoreBusyError` (nothing written; the caller keeps the edit and offers a retry). The store has no
``gpkg_ogr_contents`` table: GDAL keeps a feature count there that each writer rewrites from its own tally when it
closes, so with two writers it goes stale and fiona (and so the training export) reads fewer rows than were saved.
Without the table GDAL counts the rows themselves (:func:`drop_feature_count`).
"""

from __future__ import annotations

import os
import random
import sqlite3
import stat
import time
from datetime import datetime, timezone
from pathlib import Path

from .atomic import atomic_path
from .errors import ChangeScribeError

LAYER = "annotations"
CHANGE_CLASSES = ("building", "road", "vegetation", "water", "other")
# field name -> fiona type, in the order of the layer
FIELDS: dict[str, str] = {
    "caption": "str",
    "suggested_caption": "str",
    "edited": "bool",
    "change_class": "str",
    "no_change": "bool",
    "before_source": "str",
    "after_source": "str",
    "before_date": "str",
    "after_date": "str",
    "model_name": "str",
    "author": "str",
    "created": "str",
    "edited_at": "str",
}
# Sentences that say nothing changed, in LEVIR-CC's words (its annotators' "changeflag 0" captions): the generated
# scenes caption unchanged pairs with them, and training recognises them. The first is what an analyst's
# "No change here" stores.
NO_CHANGE_CAPTIONS = ("there is no difference", "the two scenes seem identical", "the scene is the same as before",
                      "no change has occurred", "almost nothing has changed")
NO_CHANGE_CAPTION = NO_CHANGE_CAPTIONS[0]
# How long a save waits for another writer to finish before it gives up and says so.
BUSY_TIMEOUT_S = 10.0


class AnnotationStoreError(ChangeScribeError):
    """The annotation store is missing, read-only, or not a ChangeScribe annotation GeoPackage."""


class StoreBusyError(AnnotationStoreError):
    """Another program kept the store locked for longer than the save would wait; nothing was written."""


def is_busy(error: BaseException | str) -> bool:
    """SQLite's "database is locked" / "busy", however GDAL, fiona or QGIS word it."""
    text = str(error).lower()
    return "database is locked" in text or "database is busy" in text or "sqlite_busy" in text


def busy_message(path: str | os.PathLike, waited: float) -> str:
    return (f"the annotation store {Path(path).name} is busy: another program (a second QGIS, a script) has been "
            f"writing it for {waited:.0f} s; the annotation was not saved and is kept here, save again to retry")


def drop_feature_count(path: str | os.PathLike, timeout: float = BUSY_TIMEOUT_S) -> None:
    """Remove GDAL's cached feature count (``gpkg_ogr_contents`` and its triggers) so readers count rows."""
    con = sqlite3.connect(str(path), timeout=timeout)
    try:
        if con.execute("SELECT 1 FROM sqlite_master WHERE name = 'gpkg_ogr_contents'").fetchone() is None:
            return
        with con:
            for (name,) in con.execute("SELECT name FROM sqlite_master WHERE type = 'trigger' AND "
                                       "name LIKE 'trigger_%_feature_count_%'").fetchall():
                con.execute(f'DROP TRIGGER IF EXISTS "{name}"')
            con.execute("DROP TABLE gpkg_ogr_contents")
    except sqlite3.OperationalError as exc:
        if is_busy(exc):
            raise StoreBusyError(busy_message(path, timeout)) from None
        raise AnnotationStoreError(f"annotation store {path}: {exc}") from None
    finally:
        con.close()


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _missing_fields(path: Path) -> list[str] | None:
    """Fields the ``annotations`` layer lacks; None when the file holds no such layer (or is no GeoPackage)."""
    # A WAL database in a read-only folder cannot be opened read-only without its -shm file: then read it as
    # immutable (nobody can be writing it there anyway).
    for uri in (f"file:{path}?mode=ro", f"file:{path}?immutable=1"):
        try:
            con = sqlite3.connect(uri, uri=True)
        except sqlite3.Error:
            continue
        try:
            row = con.execute("SELECT data_type FROM gpkg_contents WHERE table_name = ?", (LAYER,)).fetchone()
            if row is None or row[0] != "features":
                return None
            cols = {r[1] for r in con.execute(f'PRAGMA table_info("{LAYER}")')}
        except sqlite3.DatabaseError as exc:
            if "unable to open" in str(exc):
                continue
            return None
        finally:
            con.close()
        return [f for f in FIELDS if f not in cols]
    return None


def _writable(path: Path) -> bool:
    """Writable by this process, also for root (which os.access lets through): a cleared write bit counts."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return False
    return os.access(path, os.W_OK) and bool(mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))


def check_store(path: str | os.PathLike) -> Path:
    """The store's path when it can take edits; else :class:`AnnotationStoreError` saying what is wrong."""
    path = Path(path)
    if not path.exists():
        raise AnnotationStoreError(f"annotation store {path} does not exist (create it first)")
    if not path.is_file():
        raise AnnotationStoreError(f"annotation store {path} is not a file")
    if not _writable(path):
        raise AnnotationStoreError(f"annotation store {path} is read-only; annotations could not be saved "
                                   "(make the file writable or create a new store elsewhere)")
    if not _writable(path.parent):
        raise AnnotationStoreError(f"the folder of the annotation store ({path.parent}) is read-only; the "
                                   "GeoPackage needs to write its journal beside it (move the store)")
    missing = _missing_fields(path)
    if missing is None:
        raise AnnotationStoreError(f"{path} is not a ChangeScribe annotation store (no '{LAYER}' layer in a "
                                   "GeoPackage); pick another file or create a new store")
    if missing:
        raise AnnotationStoreError(f"annotation store {path} lacks the field(s) {', '.join(missing)}")
    return path


def set_wal(path: str | os.PathLike) -> None:
    """Switch a GeoPackage to WAL journal mode (persistent in the file) and verify."""
    con = sqlite3.connect(str(path))
    try:
        mode = con.execute("PRAGMA journal_mode=WAL").fetchone()[0]
    finally:
        con.close()
    if str(mode).lower() != "wal":
        raise AnnotationStoreError(f"{path}: the GeoPackage could not be switched to WAL mode (got {mode})")


def create_store(path: str | os.PathLike, crs) -> Path:
    """Create an empty annotation store at ``path`` (a ``.gpkg``) in ``crs``; atomic (temp file + rename).

    An existing valid store is left as it is and returned; any other existing file is refused.
    """
    import fiona
    from fiona.crs import CRS

    path = Path(path)
    if path.suffix.lower() != ".gpkg":
        raise AnnotationStoreError(f"an annotation store must be a .gpkg file, got {path.name}")
    if path.exists():
        if _missing_fields(path) == []:
            return check_store(path)
        raise AnnotationStoreError(f"{path} exists and is not a ChangeScribe annotation store; "
                                   "it is not overwritten (choose another name)")
    folder = path.parent
    if not folder.is_dir():
        raise AnnotationStoreError(f"folder {folder} does not exist")
    if not _writable(folder):
        raise AnnotationStoreError(f"folder {folder} is read-only; create the annotation store elsewhere")
    with atomic_path(path, ".tmp.gpkg") as tmp:
        schema = {"geometry": "Polygon", "properties": dict(FIELDS)}
        crs_obj = CRS.from_user_input(crs.to_wkt() if hasattr(crs, "to_wkt") else crs)
        with fiona.open(tmp, "w", driver="GPKG", layer=LAYER, schema=schema, crs=crs_obj):
            pass
        con = sqlite3.connect(tmp)
        try:
            with con:
                con.execute("UPDATE gpkg_contents SET description = ? WHERE table_name = ?",
                            ("ChangeScribe annotations: analysts' areas and captions", LAYER))
        finally:
            con.close()
        set_wal(tmp)
        drop_feature_count(tmp)
        if path.exists():  # someone created it meanwhile: never overwrite
            raise AnnotationStoreError(f"{path} appeared while the store was being created; not overwritten")
    return path


def annotation_record(caption: str, suggested_caption: str = "", change_class: str | None = None,
                      no_change: bool = False, before_source: str = "", after_source: str = "",
                      before_date: str = "", after_date: str = "", model_name: str = "", author: str = "",
                      created: str | None = None) -> dict:
    """The attributes of one annotation, with ``edited`` and timestamps filled in."""
    if change_class is not None and change_class not in CHANGE_CLASSES:
        raise AnnotationStoreError(f"unknown change class {change_class!r}; one of {', '.join(CHANGE_CLASSES)}")
    if no_change and not caption:
        caption = NO_CHANGE_CAPTION
    stamp = now_iso()
    return {"caption": caption, "suggested_caption": suggested_caption,
            "edited": bool(suggested_caption) and caption.strip() != suggested_caption.strip(),
            "change_class": None if no_change else change_class, "no_change": bool(no_change),
            "before_source": before_source, "after_source": after_source, "before_date": before_date,
            "after_date": after_date, "model_name": model_name, "author": author or _user(),
            "created": created or stamp, "edited_at": stamp}


def _user() -> str:
    try:
        import getpass

        return getpass.getuser()
    except Exception:  # noqa: BLE001 - no user name is no reason to lose an annotation
        return ""


def add_annotations(path: str | os.PathLike, items: list[tuple[object, dict]], crs=None) -> int:
    """Append (geometry, attributes) pairs (shapely geometries in the store's CRS unless ``crs`` is given)
    in one transaction; returns how many were written."""
    import geopandas as gpd

    path = check_store(path)
    if not items:
        return 0
    rows = []
    for _, attrs in items:
        unknown = set(attrs) - set(FIELDS)
        if unknown:
            raise AnnotationStoreError(f"unknown annotation field(s): {', '.join(sorted(unknown))}")
        rows.append({k: attrs.get(k) for k in FIELDS})
    drop_feature_count(path)  # a store made by an older version still has the count that goes stale
    store_crs = _store_crs(path)
    gdf = gpd.GeoDataFrame(rows, geometry=[g for g, _ in items], crs=crs or store_crs)
    if crs is not None and store_crs is not None:
        gdf = gdf.to_crs(store_crs)
    # GDAL fails at once on a locked store, before it has inserted anything (the first INSERT needs the lock and
    # keeps it to the commit), so retrying writes each row exactly once.
    started = time.monotonic()
    while True:
        try:
            gdf.to_file(path, layer=LAYER, driver="GPKG", mode="a",
                        schema={"geometry": "Polygon", "properties": dict(FIELDS)})
            return len(rows)
        except Exception as exc:  # noqa: BLE001 (fiona's / pyogrio's / GDAL's error classes differ by version)
            waited = time.monotonic() - started
            if not is_busy(exc):
                raise AnnotationStoreError(f"annotations could not be saved to {path}: "
                                           f"{' '.join(str(exc).split())}") from None
            if waited >= BUSY_TIMEOUT_S:
                raise StoreBusyError(busy_message(path, waited)) from None
            time.sleep(random.uniform(0.02, 0.2))  # noqa: S311 (back-off jitter, not cryptography)


def _store_crs(path: Path):
    import fiona

    with fiona.open(path, layer=LAYER) as src:
        return src.crs_wkt or None


def read_annotations(path: str | os.PathLike):
    """Every annotation as a GeoDataFrame (booleans as bool, empty class as None)."""
    import geopandas as gpd

    path = Path(path)
    if _missing_fields(path) != []:
        raise AnnotationStoreError(f"{path} is not a ChangeScribe annotation store")
    gdf = gpd.read_file(path, layer=LAYER)
    for col in ("edited", "no_change"):
        gdf[col] = gdf[col].fillna(False).astype(bool)
    gdf["change_class"] = gdf["change_class"].where(gdf["change_class"].notna(), None)
    return gdf


def integrity_ok(path: str | os.PathLike) -> bool:
    """SQLite's own ``PRAGMA integrity_check`` on the store."""
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        con.close()
