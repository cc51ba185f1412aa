"""No import circles in the package, function-level imports included.

A circle hidden by a lazy import still couples two modules both ways: neither can be read, tested
or moved without the other. The graph is read from the source (every ``import`` statement, at any
depth, except under ``if TYPE_CHECKING:``), so a lazy import counts as much as a top-level one.
"""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "rtml_ebpf"


def module_name(path: Path, pkg: Path = PKG) -> str:
    rel = path.relative_to(pkg.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def known_modules(root: Path) -> dict[str, Path]:
    """Python modules, and C extensions (a leaf: they import nothing of ours) by their source."""
    return {module_name(p, root): p for p in [*root.rglob("*.py"), *root.rglob("*.c")]}


def _runtime_imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement that runs: nested in functions too, not under TYPE_CHECKING."""
    found: list[ast.Import | ast.ImportFrom] = []

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                for sub in child.orelse:
                    visit(sub)
                continue
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                found.append(child)
            visit(child)

    visit(tree)
    return found


def edges(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package modules ``name`` imports. ``from . import x`` is an edge to the module x when
    there is one (not to the package), as Python resolves it."""
    is_pkg = path.name == "__init__.py"
    base = name.split(".") if is_pkg else name.split(".")[:-1]
    out: set[str] = set()
    for node in _runtime_imports(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            if node.level:
                anchor = base[: len(base) - (node.level - 1)]
                mod = ".".join(anchor + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in modules else mod for a in node.names]
        for t in targets:
            while t and t not in modules:
                t = t.rpartition(".")[0]
            if t and t != name and t.startswith("rtml_ebpf"):
                out.add(t)
    return out


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    comps: list[list[str]] = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return comps


def package_graph() -> dict[str, set[str]]:
    modules = known_modules(PKG)
    return {name: edges(name, path, modules) if path.suffix == ".py" else set() for name, path in modules.items()}


def test_no_import_cycles() -> None:
    graph = package_graph()
    cycles = find_cycles(graph)
    detail = "\n".join(
        " <-> ".join(c) + ":\n" + "\n".join(f"    {a} imports {b}" for a in c for b in sorted(graph[a] & set(c)))
        for c in cycles)
    assert not cycles, f"import circles in rtml_ebpf (lazy imports count):\n{detail}"


def test_the_cycle_finder_sees_a_lazy_circle(tmp_path: Path) -> None:
    """The control: a circle made only by a function-level import is found."""
    pkg = tmp_path / "rtml_ebpf"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from . import b\n")
    (pkg / "b.py").write_text("def f():\n    from .a import thing\n    return thing\n")
    (pkg / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from . import a\n")
    modules = known_modules(pkg)
    graph = {n: edges(n, p, modules) for n, p in modules.items()}
    assert find_cycles(graph) == [["rtml_ebpf.a", "rtml_ebpf.b"]]
    assert graph["rtml_ebpf.c"] == set()
