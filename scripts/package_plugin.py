"""Build the zip QGIS's Plugin Manager installs: the plugin folder as ``changescribe/``, without development
files (tests, training, bench, scripts, docs' sources)."""

from __future__ import annotations

import argparse
import configparser
import fnmatch
import subprocess
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
INCLUDE = ["__init__.py", "__main__.py", "metadata.txt", "LICENSE", "README.md", "requirements.txt", "constraints.txt",
           "core", "plugin", "resources"]
EXCLUDE = ["*/__pycache__/*", "*.pyc", "*.tmp.*", ".*"]


def tracked_files() -> set[str] | None:
    """Files git tracks (so stray local outputs never ship); None outside a git checkout."""
    try:
        out = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    return set(out.splitlines())


def build(out_dir: Path) -> Path:
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "metadata.txt")
    version = cfg["general"]["version"]
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / f"changescribe-{version}.zip"
    tracked = tracked_files()
    with zipfile.ZipFile(target, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for item in INCLUDE:
            path = REPO / item
            files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
            for f in files:
                rel = f.relative_to(REPO).as_posix()
                if any(fnmatch.fnmatch("/" + rel, pat) or fnmatch.fnmatch(f.name, pat) for pat in EXCLUDE):
                    continue
                if tracked is not None and rel not in tracked:
                    continue
                zf.write(f, f"changescribe/{rel}")
    return target


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="dist", help="folder for the zip")
    target = build(Path(ap.parse_args().out))
    with zipfile.ZipFile(target) as zf:
        names = zf.namelist()
    print(f"{target} ({target.stat().st_size / 1e6:.1f} MB, {len(names)} files)")


if __name__ == "__main__":
    main()
