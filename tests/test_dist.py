"""Packaging: one version source, the abi3 C check, and the BPF object built once and reused by
builds that have no clang (scripts/build_bpf.py ensure_bpf, what setup.py runs). The whole
chain (wheel tags, install without a compiler, eBPF check as root) is `make dist`."""

from __future__ import annotations

import ast
import importlib.util
import os
import re
import shutil
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent


def build_bpf() -> ModuleType:
    spec = importlib.util.spec_from_file_location("build_bpf", ROOT / "scripts" / "build_bpf.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture
def tree(tmp_path: Path) -> tuple[Path, Path]:
    """A copy of bpf/ and an empty output directory."""
    src = tmp_path / "bpf"
    shutil.copytree(ROOT / "bpf", src)
    return src, tmp_path / "out"


def no_clang(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    empty = tmp_path / "empty-path"
    empty.mkdir(exist_ok=True)
    monkeypatch.setenv("PATH", str(empty))
    monkeypatch.delenv("CLANG", raising=False)
    monkeypatch.delenv("RTML_REBUILD_BPF", raising=False)


def test_the_version_has_one_source() -> None:
    import rtml_ebpf

    pyproject = (ROOT / "pyproject.toml").read_text()  # text: tomllib is 3.11+, the matrix has 3.10
    project = pyproject.split("[project]", 1)[1].split("\n[", 1)[0]
    assert not re.search(r"^version\s*=", project, re.M), "the version is set in rtml_ebpf/__init__.py only"
    assert re.search(r'^dynamic\s*=\s*\["version"\]', project, re.M)
    assert 'version = { attr = "rtml_ebpf.__version__" }' in pyproject
    assigned = [n for n in ast.parse((ROOT / "rtml_ebpf" / "__init__.py").read_text()).body
                if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", "") == "__version__"]
    assert len(assigned) == 1 and ast.literal_eval(assigned[0].value) == rtml_ebpf.__version__
    assert f"## {rtml_ebpf.__version__}" in (ROOT / "CHANGELOG.md").read_text()


def test_the_c_check_is_the_one_abi3_module() -> None:
    # make setup (scripts/setup.sh) rebuilds it in place; a per-version build would shadow it
    from rtml_ebpf import _hot

    assert str(_hot.__file__).endswith(".abi3.so"), f"{_hot.__file__}: run make setup (scripts/setup.sh)"
    assert not list((ROOT / "rtml_ebpf").glob("_hot.cpython-*.so"))


def test_compiled_once_then_reused_while_the_sources_match(tree: tuple[Path, Path]) -> None:
    src, out = tree
    bb = build_bpf()
    assert bb.ensure_bpf(str(out), str(src)) == "compiled"
    obj = out / "rtml.bpf.o"
    first = obj.read_bytes()
    assert first[:4] == b"\x7fELF" and (out / bb.STAMP).read_text().strip() == bb.sources_digest(str(src))
    os.utime(obj, (1, 1))
    assert bb.ensure_bpf(str(out), str(src)) == "shipped"
    assert obj.stat().st_mtime == 1 and obj.read_bytes() == first  # not compiled again


def test_without_clang_the_shipped_object_is_used(tree: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch,
                                                  tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src, out = tree
    bb = build_bpf()
    bb.compile_bpf(str(out), src_dir=str(src))
    shipped = (out / "rtml.bpf.o").read_bytes()
    no_clang(monkeypatch, tmp_path)
    assert shutil.which("clang") is None
    assert bb.ensure_bpf(str(out), str(src)) == "shipped"
    assert (out / "rtml.bpf.o").read_bytes() == shipped
    # asked to rebuild without the means: the matching object still serves, and it says why
    monkeypatch.setenv("RTML_REBUILD_BPF", "1")
    assert bb.ensure_bpf(str(out), str(src)) == "shipped"
    assert "clang is not on PATH" in capsys.readouterr().out


def test_without_clang_changed_sources_fail_saying_what_to_install(
    tree: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    src, out = tree
    bb = build_bpf()
    bb.compile_bpf(str(out), src_dir=str(src))
    with open(src / "rtml.bpf.c", "a") as f:
        f.write("\n/* changed after the object was built */\n")
    no_clang(monkeypatch, tmp_path)
    with pytest.raises(SystemExit) as exc:
        bb.ensure_bpf(str(out), str(src))
    msg = str(exc.value)
    assert "clang is not on PATH" in msg and "apt-get install clang llvm libbpf-dev" in msg
    assert "dnf install clang llvm libbpf-devel" in msg


def test_no_object_and_no_clang_fails_saying_what_to_install(tree: tuple[Path, Path],
                                                            monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    src, out = tree
    no_clang(monkeypatch, tmp_path)
    with pytest.raises(SystemExit, match="apt-get install clang llvm libbpf-dev"):
        build_bpf().ensure_bpf(str(out), str(src))


def test_a_failed_compile_leaves_the_last_good_object_and_its_digest(
    tree: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    src, out = tree
    bb = build_bpf()
    bb.compile_bpf(str(out), src_dir=str(src))
    good, stamp = (out / "rtml.bpf.o").read_bytes(), (out / bb.STAMP).read_text()
    monkeypatch.setenv("CLANG", shutil.which("false") or "/bin/false")
    monkeypatch.setenv("RTML_REBUILD_BPF", "1")
    assert bb.ensure_bpf(str(out), str(src)) == "shipped"  # the sources did not change: still good
    assert "failed" in capsys.readouterr().out
    assert (out / "rtml.bpf.o").read_bytes() == good and (out / bb.STAMP).read_text() == stamp
    assert not [p for p in out.iterdir() if p.name.startswith(".build-")]


def test_the_sdist_manifest_ships_the_object_and_its_digest() -> None:
    manifest = (ROOT / "MANIFEST.in").read_text()
    assert "rtml_ebpf/bpf/rtml.bpf.o" in manifest and "rtml_ebpf/bpf/SOURCES.sha256" in manifest
