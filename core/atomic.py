"""Writing a file so that its path holds either the old content or the complete new one, never a half.

Every temporary a run makes (a file beside its output, a folder in the system's temporary folder) carries the
process id in its name: ``.<stem>.changescribe-<pid>-<random>.tmp.<ext>`` and ``changescribe-<pid>-<random>``.
A process killed with SIGKILL cannot clean up; a later run, the dock, or ``changescribe clean`` recognises those
leftovers by that pattern and a process id that is no longer running (:func:`remove_stale_temporaries`), and
never touches a file that does not match it.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

# SQLite (GeoPackage) leaves these beside a database while it is open.
_SIDECARS = ("-journal", "-wal", "-shm")
TAG = "changescribe"
# A temporary beside an output, with its SQLite sidecars; group 1 is the owning process id.
_FILE_PATTERN = re.compile(rf"^\..+\.{TAG}-(\d+)-[a-z0-9_]+\.tmp\.[a-z0-9]+(?:-journal|-wal|-shm)?$")
# A run's folder in the temporary folder (probability map, scratch regions, a worker's TMPDIR).
_DIR_PATTERN = re.compile(rf"^{TAG}-(?:[a-z]+-)?(\d+)-[a-z0-9_]+$")


def temp_prefix(kind: str = "") -> str:
    """Prefix of this process's temporary folders: ``changescribe-[kind-]<pid>-``."""
    return f"{TAG}-{kind + '-' if kind else ''}{os.getpid()}-"


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = ".tmp") -> Iterator[str]:
    """A free temporary path beside ``path``, renamed onto it only if the block succeeds.

    The temporary file is not created (GDAL drivers want to create their files themselves); whatever is left
    of it, SQLite sidecars included, is removed on failure.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.{TAG}-{os.getpid()}-", suffix=suffix, dir=path.parent)
    os.close(fd)
    os.unlink(tmp)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        for leftover in (tmp, *(tmp + s for s in _SIDECARS)):
            if os.path.exists(leftover):
                os.unlink(leftover)


def pid_alive(pid: int) -> bool:
    """Whether a process with this id runs; when that cannot be told, it counts as running (keep its files)."""
    if pid <= 0:
        return True
    if sys.platform == "win32":
        try:
            import psutil  # type: ignore[import-not-found]
        except ImportError:
            return True
        return bool(psutil.pid_exists(pid))
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # EPERM: someone else's live process
    return True


def temporaries(folder: str | os.PathLike, pid: int | None = None) -> list[Path]:
    """ChangeScribe's temporaries directly in ``folder``: of process ``pid``, or of every process that is gone."""
    folder = Path(folder)
    found = []
    try:
        entries = list(folder.iterdir())
    except OSError:
        return found
    for p in entries:
        m = (_FILE_PATTERN if not p.is_dir() else _DIR_PATTERN).match(p.name)
        if m is None:
            continue
        owner = int(m.group(1))
        if (pid is not None and owner == pid) or (pid is None and owner != os.getpid() and not pid_alive(owner)):
            found.append(p)
    return sorted(found)


def remove_temporaries(folder: str | os.PathLike, pid: int | None = None) -> list[Path]:
    """Remove :func:`temporaries` of ``folder`` (of ``pid``, else of dead processes); returns what went."""
    removed = []
    for p in temporaries(folder, pid):
        try:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
            removed.append(p)
        except OSError:
            pass
    return removed


def remove_stale_temporaries(*folders: str | os.PathLike) -> list[Path]:
    """Leftovers of crashed runs in ``folders`` and in the system's temporary folder."""
    removed: list[Path] = []
    for folder in {*(str(f) for f in folders if f), tempfile.gettempdir()}:
        removed += remove_temporaries(folder)
    return removed
