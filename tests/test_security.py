"""Static security checks that the QGIS plugin repository also runs: bandit at medium severity, no shell."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SUBPROCESS_CALLS = {"run", "Popen", "call", "check_call", "check_output", "getoutput", "getstatusoutput"}


def test_bandit_finds_nothing_of_medium_or_high_severity_in_core_and_plugin():
    pytest.importorskip("bandit", reason="bandit comes with requirements-dev.txt (make setup)")
    proc = subprocess.run([sys.executable, "-m", "bandit", "-r", "core", "plugin", "--severity-level", "medium",
                           "-f", "json", "-q"], cwd=REPO, capture_output=True, text=True, timeout=600)
    report = json.loads(proc.stdout)
    found = [f"{r['filename']}:{r['line_number']} {r['test_id']} {r['issue_text']}" for r in report["results"]]
    assert found == [], "\n".join(found)
    assert report["metrics"]["_totals"]["loc"] > 1000  # it really scanned the code


def test_every_subprocess_call_takes_an_argument_list_and_no_shell():
    offenders = []
    for folder in ("core", "plugin", "training", "scripts", "bench"):
        for path in (REPO / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
                    continue
                owner = node.func.value
                where = f"{path.relative_to(REPO)}:{node.lineno}"
                if isinstance(owner, ast.Name) and owner.id == "os" and node.func.attr in ("system", "popen"):
                    offenders.append(f"{where} os.{node.func.attr}")
                if not (isinstance(owner, ast.Name) and owner.id == "subprocess"
                        and node.func.attr in SUBPROCESS_CALLS):
                    continue
                if any(k.arg == "shell" and not (isinstance(k.value, ast.Constant) and k.value.value is False)
                       for k in node.keywords):
                    offenders.append(f"{where} shell=")
                first = node.args[0] if node.args else next((k.value for k in node.keywords if k.arg == "args"), None)
                if isinstance(first, (ast.Constant, ast.JoinedStr, ast.BinOp)) or node.func.attr.startswith("get"):
                    offenders.append(f"{where} a command string")
    assert offenders == []
