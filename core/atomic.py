"""Writing a file so that its path holds either the old content or the complete new one, never a half."""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

# SQLite (GeoPackage) leaves these beside a database while it is open.
_SIDECARS = ("-journal", "-wal", "-shm")


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = ".tmp") -> Iterator[str]:
    """A free temporary path beside ``path``, renamed onto it only if the block succeeds.

    The temporary file is not created (GDAL drivers want to create their files themselves); whatever is left
    of it, SQLite sidecars included, is removed on failure.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    os.unlink(tmp)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        for leftover in (tmp, *(tmp + s for s in _SIDECARS)):
            if os.path.exists(leftover):
                os.unlink(leftover)
