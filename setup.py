"""Compiles bpf/*.bpf.c into rtml_ebpf/bpf/ when the package is built or installed.

The object is CO-RE: built once with clang against bpf/kernel_types.h (no
vmlinux.h from the build host), relocated by libbpf at load time on any
kernel with BTF.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))
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


class BuildWithBpf(build_py):
    def run(self) -> None:
        compile_bpf(os.path.join(HERE, "rtml_ebpf", "bpf"))
        super().run()
        if not getattr(self, "editable_mode", False):
            compile_bpf(os.path.join(self.build_lib, "rtml_ebpf", "bpf"))


setup(cmdclass={"build_py": BuildWithBpf})
