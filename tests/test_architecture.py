"""House rules that keep the plugin installable and core/ + training/ usable without QGIS."""

from __future__ import annotations

import ast
import configparser
import subprocess
import sys
from pathlib import Path

import pytest

from changescribe.core.version import VERSION

REPO = Path(__file__).resolve().parent.parent
FORBIDDEN = ("qgis", "PyQt5", "PyQt6", "PySide2", "PySide6", "processing")


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", ["core", "training"])
def test_core_and_training_never_import_qgis_or_qt(package):
    offenders = {str(p.relative_to(REPO)): sorted(imported_modules(p) & set(FORBIDDEN))
                 for p in (REPO / package).rglob("*.py")}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_core_imports_in_a_python_where_qgis_cannot_be_imported():
    # A real interpreter whose import system refuses qgis/Qt: what the GPU box and CI without QGIS look like.
    code = ("import sys\n"
            "class Block:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            f"        if name.split('.')[0] in {FORBIDDEN!r}: raise ImportError('blocked ' + name)\n"
            "sys.meta_path.insert(0, Block())\n"
            "import changescribe.core.pipeline, changescribe.core.cli, changescribe.training.synthetic\n"
            "import changescribe.core.model_file, changescribe.core.models.registry\n"
            "import changescribe.training\n"
            "print('ok')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"


def internal_imports(path: Path, package_root: Path) -> set[str]:
    """The modules of this repository that ``path`` imports, lazily inside functions too (an import circle is a
    circle whenever it is closed); imports under ``if TYPE_CHECKING:`` do not run and do not count."""
    here = list(path.relative_to(package_root).parts[:-1])  # the package the module is in
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            if isinstance(child, ast.ImportFrom) and child.level:
                base = here[:len(here) - child.level + 1] + (child.module.split(".") if child.module else [])
                found.add(".".join(base))
                found.update(".".join(base + [a.name]) for a in child.names)
            elif isinstance(child, ast.ImportFrom) and child.module and child.module.startswith("changescribe."):
                base = child.module.split(".")[1:]
                found.add(".".join(base))
                found.update(".".join(base + [a.name]) for a in child.names)
            visit(child)

    visit(ast.parse(path.read_text(), filename=str(path)))
    return found


def import_cycles(packages: tuple[str, ...]) -> list[list[str]]:
    """Strongly connected groups of more than one module in the import graph of ``packages`` (Tarjan)."""
    modules = {}
    for package in packages:
        for p in (REPO / package).rglob("*.py"):
            rel = p.relative_to(REPO).with_suffix("")
            modules[".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)] = p
    graph = {m: {t for t in internal_imports(p, REPO) if t in modules and t != m} for m, p in modules.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                cycles.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return cycles


@pytest.mark.parametrize("package", ["core", "plugin"])
def test_no_import_circle(package):
    assert import_cycles((package,)) == []


def test_the_cycle_finder_finds_a_circle(tmp_path, monkeypatch):
    """The check itself can fail: two modules that import each other (one lazily) are one circle."""
    pkg = tmp_path / "demo"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .b import f\n")
    (pkg / "b.py").write_text("def f():\n    from .a import g\n    return g\n")
    (pkg / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .a import f\n")
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    assert import_cycles(("demo",)) == [["demo.a", "demo.b"]]


def test_core_has_a_public_surface_that_imports_without_torch():
    code = ("import sys, changescribe.core as core\n"
            "print('torch' in sys.modules)\n"
            "print(all(getattr(core, n) is not None for n in core.__all__))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["False", "True"]


def test_training_is_not_imported_by_core_or_plugin():
    for package in ("core", "plugin"):
        for p in (REPO / package).rglob("*.py"):
            text = p.read_text()
            assert "training" not in {m for m in imported_modules(p)}, p
            assert "from ..training" not in text and "from ...training" not in text, p


def test_plugin_init_is_import_light():
    code = ("import sys, importlib\n"
            "import changescribe\n"
            "heavy = [m for m in ('torch', 'rasterio', 'geopandas', 'qgis') if m in sys.modules]\n"
            "print(','.join(heavy))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == ""


def test_metadata_is_complete_and_versions_agree():
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "metadata.txt")
    general = cfg["general"]
    for key in ("name", "description", "about", "version", "qgisMinimumVersion", "author", "email", "repository",
                "tracker", "tags", "icon", "experimental", "hasProcessingProvider"):
        assert general.get(key, "").strip(), key
    assert general["version"] == VERSION
    assert (REPO / general["icon"]).is_file()
    assert f'version = "{VERSION}"' in (REPO / "pyproject.toml").read_text()


def test_plugin_uses_qt_only_through_qgis_pyqt():
    for p in (REPO / "plugin").rglob("*.py"):
        mods = imported_modules(p)
        assert not mods & {"PyQt5", "PyQt6", "PySide2", "PySide6"}, p


def test_plugin_zip_has_the_plugin_and_nothing_of_development(tmp_path):
    import zipfile

    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "package_plugin.py"), "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    (zip_path,) = tmp_path.glob("changescribe-*.zip")
    names = zipfile.ZipFile(zip_path).namelist()
    top = {n.split("/")[1] for n in names}
    assert all(n.startswith("changescribe/") for n in names)
    assert {"__init__.py", "metadata.txt", "core", "plugin", "resources", "LICENSE"} <= top
    assert not top & {"tests", "training", "bench", "scripts", ".ci", "runs", "build"}
    assert "changescribe/resources/models/pix4cap-synthetic.safetensors" in names
    assert not any("__pycache__" in n for n in names)
    assert not any(n.endswith("synthetic.py") for n in names)  # the scene generator is training's, not shipped
