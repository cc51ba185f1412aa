"""Compiles bpf/*.bpf.c into rtml_ebpf/bpf/ (or OUT_DIR): the CO-RE object the package ships.

    python3 scripts/build_bpf.py [OUT_DIR]      (what `make bpf` and setup.py's build step run)

Built once with clang against bpf/kernel_types.h (no vmlinux.h from the build host) and
relocated by libbpf at load time on any kernel with BTF. The object is built once: the sdist
carries it with SOURCES.sha256, the digest of the bpf/ sources and of this script it was built
from, and a package build (setup.py: ensure_bpf) uses an object whose digest matches the sources
beside it instead of compiling again, so every wheel ships the sdist's object, byte for byte, and
a build from the sdist needs no clang. RTML_REBUILD_BPF=1 compiles anyway.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SRC_DIR = os.path.join(HERE, "bpf")
ARCH = {"x86_64": "x86", "aarch64": "arm64", "arm64": "arm64"}.get(platform.machine(), "x86")
STAMP = "SOURCES.sha256"
INSTALL_HINT = (
    "install clang, llvm and libbpf's headers (Debian/Ubuntu: apt-get install clang llvm libbpf-dev; "
    "Fedora/RHEL: dnf install clang llvm libbpf-devel; Alpine: apk add clang llvm libbpf-dev), "
    "or install a published wheel (pip install rtml-ebpf), which carries the compiled object"
)


def sources_digest(src_dir: str = SRC_DIR) -> str:
    """sha256 over the names and bytes of bpf/*.c, bpf/*.h and this script (its clang flags):
    what the object is built from."""
    h = hashlib.sha256()
    paths = [os.path.join(src_dir, n) for n in sorted(os.listdir(src_dir)) if n.endswith((".c", ".h"))]
    for path in [*paths, os.path.abspath(__file__)]:
        h.update(os.path.basename(path).encode() + b"\0")
        with open(path, "rb") as f:
            h.update(f.read() + b"\0")
    return h.hexdigest()


def objects(src_dir: str = SRC_DIR) -> list[str]:
    return [name[:-2] + ".o" for name in sorted(os.listdir(src_dir)) if name.endswith(".bpf.c")]


def compile_bpf(out_dir: str, clang: str | None = None, src_dir: str = SRC_DIR) -> None:
    clang = clang or os.environ.get("CLANG") or shutil.which("clang")
    if not clang:
        raise SystemExit(f"rtml-ebpf: clang is needed to build the BPF object: {INSTALL_HINT}")
    os.makedirs(out_dir, exist_ok=True)
    # Built aside and moved in only whole: a failed build never leaves a half-written object
    # beside a digest that vouches for it.
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".build-") as tmp:
        for name in objects(src_dir):
            out = os.path.abspath(os.path.join(tmp, name))
            # Relative source names (cwd: bpf/): the object records no build directory.
            cmd = [clang, "-g", "-O2", "-target", "bpf", f"-D__TARGET_ARCH_{ARCH}", "-Wall", "-Werror",
                   "-I", ".", "-c", name[:-2] + ".c", "-o", out]
            print("rtml-ebpf:", " ".join(cmd), f"(in {src_dir})")
            subprocess.run(cmd, check=True, cwd=src_dir)
            llvm_strip = shutil.which("llvm-strip")
            if llvm_strip:  # drop DWARF, keep BTF (needed for CO-RE)
                subprocess.run([llvm_strip, "-g", out], check=True)
        with open(os.path.join(tmp, STAMP), "w") as f:
            f.write(sources_digest(src_dir) + "\n")
        for name in [*objects(src_dir), STAMP]:
            os.replace(os.path.join(tmp, name), os.path.join(out_dir, name))


def shipped_object_matches(out_dir: str, src_dir: str = SRC_DIR) -> bool:
    """True when out_dir holds every object and the digest of the sources they were built from
    is the digest of the sources in src_dir now (an sdist's, or an unchanged checkout's)."""
    try:
        with open(os.path.join(out_dir, STAMP)) as f:
            stamp = f.read().strip()
    except OSError:
        return False
    have = all(os.path.isfile(os.path.join(out_dir, name)) for name in objects(src_dir))
    return have and stamp == sources_digest(src_dir)


def ensure_bpf(out_dir: str, src_dir: str = SRC_DIR) -> str:
    """The object in out_dir: the one already there when it was built from these very sources
    (an sdist's, or an unchanged checkout's), else compiled here. Returns "shipped" or "compiled";
    exits saying what to install when it can be neither."""
    rebuild = os.environ.get("RTML_REBUILD_BPF") == "1"
    if not rebuild and shipped_object_matches(out_dir, src_dir):
        print(f"rtml-ebpf: using the BPF object in {out_dir}, built from these bpf/ sources "
              "(RTML_REBUILD_BPF=1 compiles it again)")
        return "shipped"
    clang = os.environ.get("CLANG") or shutil.which("clang")
    why = "clang is not on PATH"
    if clang:
        try:
            compile_bpf(out_dir, clang, src_dir)
            return "compiled"
        except (subprocess.CalledProcessError, OSError) as e:
            why = f"{clang} failed ({e}); libbpf's headers (bpf/bpf_helpers.h) may be missing"
    if shipped_object_matches(out_dir, src_dir):  # RTML_REBUILD_BPF=1 without the means to
        print(f"rtml-ebpf: {why}; using the BPF object in {out_dir}, built from these bpf/ sources")
        return "shipped"
    raise SystemExit(f"rtml-ebpf: cannot build the BPF object ({why}) and there is no shipped object built from "
                     f"these sources in {out_dir}: {INSTALL_HINT}")


if __name__ == "__main__":
    compile_bpf(sys.argv[1] if len(sys.argv) > 1 else os.path.join(HERE, "rtml_ebpf", "bpf"))
