"""The Python blocks of the README and of docs/ are code, not prose: they run.

Each page's ```python blocks run in order in one fresh interpreter (later blocks see what earlier
ones defined, as a reader would type them). A block that is a fragment of a larger program (a
handler body, an app the reader already has) is marked with ``<!-- doc-test: compile -->`` on the
line before its fence: it is compiled as the body of an async function, so a typo or a stale name
in an import still fails, and its imports are executed. Every docs page must be linked from the
README.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"(?P<mark><!-- doc-test: (?P<mode>\w+) -->\n)?```python\n(?P<code>.*?)```", re.S)
MODES = {"compile"}


def blocks(page: Path) -> list[tuple[str, str, int]]:
    """(mode, code, line) for every python block of a page; mode is "run" unless marked."""
    text = page.read_text()
    found = []
    for m in FENCE.finditer(text):
        mode = m.group("mode") or "run"
        assert mode == "run" or mode in MODES, f"{page.name}: unknown doc-test mode {mode!r}"
        found.append((mode, m.group("code"), text.count("\n", 0, m.start("code")) + 1))
    return found


def program(page: Path) -> str:
    """One script for the page: run blocks as they are, compile blocks as function bodies whose
    imports run."""
    out = ["import asyncio, sys"]
    for i, (mode, code, line) in enumerate(blocks(page)):
        out.append(f"# --- {page.name}:{line}")
        if mode == "run":
            out.append(code)
            continue
        body = textwrap.indent(code, "    ")
        out.append(f"async def _fragment_{i}():\n{body}\n    pass")
        imports = [n for n in ast.parse(f"async def f():\n{body}").body[0].body  # type: ignore[attr-defined]
                   if isinstance(n, (ast.Import, ast.ImportFrom))]
        out += [ast.unparse(n) for n in imports]
    out.append("print('doc-test: ok')")
    return "\n".join(out)


@pytest.mark.parametrize("page", [p for p in PAGES if blocks(p)], ids=lambda p: p.name)
def test_python_blocks_run(page: Path, tmp_path: Path) -> None:
    script = tmp_path / f"{page.stem}.py"
    script.write_text(program(page))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 0 and "doc-test: ok" in out.stdout, f"{page.name}:\n{out.stdout}\n{out.stderr}"


def test_every_docs_page_is_linked_from_the_readme() -> None:
    readme = (ROOT / "README.md").read_text()
    for page in (ROOT / "docs").glob("*.md"):
        assert f"(docs/{page.name}" in readme, f"docs/{page.name} is not linked from the README"


def test_relative_links_resolve() -> None:
    for page in PAGES:
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", page.read_text()):
            assert (page.parent / target).exists(), f"{page.name}: link to {target} does not resolve"


def test_a_compile_block_with_a_typo_fails(tmp_path: Path) -> None:
    """The control: the harness does catch a broken block."""
    page = tmp_path / "bad.md"
    page.write_text("<!-- doc-test: compile -->\n```python\nfrom rtml_ebpf import NoSuchName\n```\n"
                    "```python\nimport rtml_ebpf\n```\n")
    script = tmp_path / "bad.py"
    script.write_text(program(page))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "NoSuchName" in out.stderr
