"""The house rules a newcomer relies on: small modules with one job, classes that fit in a head,
and no generated or scratch files in git."""

from __future__ import annotations

import ast
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "rtml_ebpf"
MAX_MODULE_LINES = 450
MAX_CLASS_LINES = 250


def test_no_module_over_450_lines() -> None:
    big = {str(p.relative_to(ROOT)): n for p in PKG.rglob("*.py")
           if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES}
    assert not big, f"modules over {MAX_MODULE_LINES} lines: {big}"


def test_no_class_over_250_lines() -> None:
    big = {}
    for p in PKG.rglob("*.py"):
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.ClassDef) and node.end_lineno is not None:
                size = node.end_lineno - node.lineno + 1
                if size > MAX_CLASS_LINES:
                    big[f"{p.relative_to(ROOT)}:{node.name}"] = size
    assert not big, f"classes over {MAX_CLASS_LINES} lines: {big}"


def test_no_scratch_or_generated_files_are_tracked() -> None:
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    bad = [f for f in files if f.endswith((".ledger", ".o", ".so", ".pyc", ".tmp")) or "/__pycache__/" in f
           or f.startswith((".venv/", ".vmtest/", ".matrix/", "dist/", "demo-results/"))]
    assert not bad, f"generated or scratch files in git: {bad}"
