"""Compiles bpf/*.bpf.c into rtml_ebpf/bpf/ (or OUT_DIR): the CO-RE object the package ships.

    python3 scripts/build_bpf.py [OUT_DIR]      (what `make bpf` and setup.py's build step run)

Built once with clang against bpf/kernel_types.h (no vmlinux.h from the build host) and
relocated by libbpf at load time on any kernel with BTF.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARCH = {"x86_64": "x86", "aarch64": "arm64", "arm64": "arm64"}.get(platform.machine(), "x86")


def compile_bpf(out_dir: str) -> None:
    clang = os.environ.get("CLANG") or shutil.which("clang")
    if not clang:
        raise SystemExit("rtml-ebpf: clang is needed to build the BPF object; apt-get install clang llvm libbpf-dev")
    os.makedirs(out_dir, exist_ok=True)
    src_dir = os.path.join(HERE, "bpf")
    for name in sorted(os.listdir(src_dir)):
        if not name.endswith(".bpf.c"):
            continue
        out = os.path.join(out_dir, name[:-2] + ".o")
        cmd = [clang, "-g", "-O2", "-target", "bpf", f"-D__TARGET_ARCH_{ARCH}", "-Wall", "-Werror",
               "-I", src_dir, "-c", os.path.join(src_dir, name), "-o", out]
        print("rtml-ebpf:", " ".join(cmd))
        subprocess.run(cmd, check=True)
        llvm_strip = shutil.which("llvm-strip")
        if llvm_strip:  # drop DWARF, keep BTF (needed for CO-RE)
            subprocess.run([llvm_strip, "-g", out], check=True)



if __name__ == "__main__":
    compile_bpf(sys.argv[1] if len(sys.argv) > 1 else os.path.join(HERE, "rtml_ebpf", "bpf"))
