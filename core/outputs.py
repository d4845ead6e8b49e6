"""What a run may write, checked before it starts, and file-system errors said in one line while it writes.

A run must never destroy what it was given or what someone else made: no output (GeoPackage, probability raster,
report, cache) may resolve to an input or to one of an input's GDAL files (sidecars such as ``.aux.xml`` and
``.ovr`` included, as GDAL itself lists them), and an existing file is replaced only when ChangeScribe wrote it
(:func:`is_own_output`) or the user asked for it (``overwrite``). Every entry point (CLI, worker, Processing,
dock) reaches this through :func:`check_outputs`; the pipeline calls it, the Processing algorithm adds its report.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import sqlite3
import sys
import tempfile
from pathlib import Path
from typing import Iterable, Iterator, Mapping

from .errors import ChangeScribeError

# The GDAL metadata tag ChangeScribe puts on every probability raster it writes (cache included).
OWN_RASTER_TAG = "CHANGESCRIBE_OUTPUT"
# The first line of the HTML head of every report ChangeScribe writes.
OWN_REPORT_MARK = '<meta name="generator" content="ChangeScribe">'
# The table every ChangeScribe result GeoPackage holds (core.geopackage.RUNS_TABLE; not imported: no fiona here).
RUNS_TABLE = "changescribe_runs"
DISK_FULL = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))


class OutputError(ChangeScribeError):
    """An output cannot or must not be written (it is an input, someone else's file, read-only, disk full)."""


def _real(path: str | os.PathLike) -> str:
    return os.path.realpath(os.fspath(path))


def gdal_files(path: str | os.PathLike) -> list[str]:
    """The files GDAL reads for a raster (the file, its sidecars, a VRT's sources), resolved; [] if unreadable."""
    p = os.fspath(path)
    files = [p] if os.path.exists(p) else []
    try:
        import rasterio

        with rasterio.Env(GDAL_DISABLE_READDIR_ON_OPEN="NO"), rasterio.open(p) as ds:
            files += [f for f in ds.files if not str(f).startswith("/vsi")]
    except Exception:  # noqa: BLE001 (not a raster, or unreadable: its own path is all we can compare)
        pass
    return sorted({_real(f) for f in files})


def is_own_output(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a file ChangeScribe wrote: a result GeoPackage (its runs table), a probability
    raster (its GDAL tag) or a report (its generator mark). Anything unreadable counts as someone else's."""
    p = Path(path)
    suffix = p.suffix.lower()
    try:
        if suffix == ".gpkg":
            con = sqlite3.connect(f"file:{p}?mode=ro", uri=True)
            try:
                row = con.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?",
                                  (RUNS_TABLE,)).fetchone()
            finally:
                con.close()
            return row is not None
        if suffix in (".tif", ".tiff"):
            import rasterio

            with rasterio.open(p) as ds:
                return OWN_RASTER_TAG in ds.tags()
        if suffix in (".html", ".htm"):
            with open(p, encoding="utf-8", errors="replace") as fh:
                return OWN_REPORT_MARK in fh.read(4096)
    except Exception:  # noqa: BLE001 (a file we cannot read as ours is not ours)
        return False
    return False


def check_outputs(inputs: Iterable[str | os.PathLike | None], outputs: Mapping[str, str | os.PathLike | None],
                  overwrite: bool = False, allowed_same: Iterable[tuple[str, str | os.PathLike]] = ()) -> None:
    """Refuse a run whose outputs would destroy data, before anything is computed.

    ``outputs`` maps a role ("GeoPackage", "probability raster", ...) to a path or None. An output may not be an
    input or any file GDAL reads with an input, nor be named like an input's sidecar (``A.tif.aux.xml``), nor be a
    folder, nor share its path with another output, nor replace an existing file that ChangeScribe did not write
    unless ``overwrite``. ``allowed_same`` lists (role, input) pairs that may coincide (a cached probability map
    re-used in place). The output folders must accept a new file (read-only, missing permission and a full
    inode table are found here, not after an hour of inference).
    """
    allowed = {(role, _real(p)) for role, p in allowed_same}
    taken: dict[str, str] = {}
    for path in (p for p in inputs if p):
        for f in gdal_files(path):
            taken.setdefault(f, os.fspath(path))
    seen: dict[str, str] = {}
    for role, out in outputs.items():
        if not out:
            continue
        out = os.fspath(out)
        real = _real(out)
        if (role, real) in allowed:
            continue
        if os.path.isdir(out):
            raise OutputError(f"the {role} {out} is a folder; give a file name")
        if real in seen:
            raise OutputError(f"the {role} and the {seen[real]} are the same file ({out}); give each its own name")
        seen[real] = role
        for f, source in taken.items():
            same = real == f or (os.path.exists(out) and os.path.exists(f) and os.path.samefile(out, f))
            if same:
                what = f"the input {source}" if _real(source) == f else f"{f}, a file of the input {source}"
                raise OutputError(f"the {role} {out} would overwrite {what}; choose another output name")
            if real.startswith(f + "."):
                raise OutputError(f"the {role} {out} would be read by GDAL as a sidecar of the input {source}; "
                                  "choose another output name")
        if os.path.exists(out) and not overwrite and not is_own_output(out):
            raise OutputError(f"the {role} {out} already exists and was not written by ChangeScribe; it is not "
                              "replaced (choose another name, delete it, or ask to overwrite it)")
        check_writable_folder(Path(out).parent, role)


def check_writable_folder(folder: str | os.PathLike, role: str = "output") -> None:
    """Create and remove a probe file in ``folder`` (or its nearest existing parent): the only honest test."""
    folder = Path(folder)
    probe_dir = folder
    while not probe_dir.exists() and probe_dir != probe_dir.parent:
        probe_dir = probe_dir.parent
    if not probe_dir.is_dir():
        raise OutputError(f"cannot write the {role}: {probe_dir} is not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".changescribe-probe-", dir=probe_dir)
    except OSError as exc:
        raise OutputError(f"cannot write the {role} in {probe_dir}: {_reason(exc)}") from None
    os.close(fd)
    os.unlink(probe)


def check_free_space(folder: str | os.PathLike, needed: int, what: str) -> None:
    """Refuse up front when ``folder``'s file system has less than ``needed`` bytes free for ``what``."""
    folder = Path(folder)
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return  # not knowable here; writing will say what went wrong
    if free < needed:
        raise OutputError(f"not enough free space for {what} in {folder}: {_size(needed)} needed, "
                          f"{_size(free)} free (free some space or choose another folder)")


def _size(n: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def _reason(exc: BaseException) -> str:
    """The operating system's reason for an OSError, or the library's first line otherwise."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.rstrip(".")
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def is_disk_full(exc: BaseException) -> bool:
    """ENOSPC/EDQUOT, or SQLite's and GDAL's ways of saying the same."""
    if isinstance(exc, OSError) and exc.errno in DISK_FULL:
        return True
    text = str(exc).lower()
    return any(s in text for s in ("no space left", "disk is full", "disk quota", "database or disk is full"))


@contextlib.contextmanager
def _quiet_library_noise() -> Iterator[None]:
    """fiona's Cython code reports a GDAL error met while it closes a file that failed (a full disk) by printing
    a traceback (``sys.excepthook``) and an "Exception ignored" line (``sys.unraisablehook``), past any handler:
    in ``qgis_process`` that is a raw Traceback beside our one line. While a run writes, those two hooks log
    fiona's and rasterio's errors at debug level and hand every other exception to the hooks they replace."""
    log = logging.getLogger(__name__)
    previous_except, previous_unraisable = sys.excepthook, sys.unraisablehook

    def noise(value: BaseException | None) -> bool:
        return (type(value).__module__ or "").startswith(("fiona", "rasterio"))

    def on_except(kind, value, tb) -> None:
        if noise(value):
            log.debug("while closing after a write failure: %s", value)
        else:
            previous_except(kind, value, tb)

    def on_unraisable(unraisable) -> None:
        if noise(unraisable.exc_value):
            log.debug("while closing after a write failure: %s", unraisable.exc_value)
        else:
            previous_unraisable(unraisable)

    sys.excepthook, sys.unraisablehook = on_except, on_unraisable
    try:
        yield
    finally:
        sys.excepthook, sys.unraisablehook = previous_except, previous_unraisable


@contextlib.contextmanager
def writing(what: str, where: str | os.PathLike) -> Iterator[None]:
    """Turn a file-system, SQLite or GDAL failure while writing ``what`` into one :class:`OutputError` line."""
    try:
        with _quiet_library_noise():
            yield
    except ChangeScribeError:
        raise
    except Exception as exc:  # noqa: BLE001 (OSError, sqlite3.Error, fiona's and rasterio's error classes)
        if not _is_write_failure(exc):
            raise
        folder = Path(where) if Path(where).is_dir() else Path(where).parent
        if is_disk_full(exc):
            free = ""
            with contextlib.suppress(OSError):
                free = f", {_size(shutil.disk_usage(folder).free)} free"
            raise OutputError(f"the disk is full while writing {what} in {folder}{free}; nothing was written "
                              "(free some space and run again)") from None
        raise OutputError(f"cannot write {what} in {folder}: {_reason(exc)}") from None


def _is_write_failure(exc: BaseException) -> bool:
    if isinstance(exc, (OSError, sqlite3.Error)):
        return True
    module = type(exc).__module__ or ""
    return module.startswith(("fiona", "rasterio", "pyogrio")) or is_disk_full(exc)


__all__ = ["OWN_RASTER_TAG", "OWN_REPORT_MARK", "OutputError", "check_free_space", "check_outputs",
           "check_writable_folder", "gdal_files", "is_disk_full", "is_own_output", "writing"]
