"""Compiles the BPF object (scripts/build_bpf.py) when the package is built or installed, and
the optional C hot-path check (rtml_ebpf/_hot.c; without a compiler or Python headers the
package uses a functools.partial instead)."""

from __future__ import annotations

import os
import sys

from setuptools import Extension, setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "scripts"))
from build_bpf import compile_bpf  # noqa: E402


class BuildWithBpf(build_py):
    def run(self) -> None:
        compile_bpf(os.path.join(HERE, "rtml_ebpf", "bpf"))
        super().run()
        if not getattr(self, "editable_mode", False):
            compile_bpf(os.path.join(self.build_lib, "rtml_ebpf", "bpf"))


setup(cmdclass={"build_py": BuildWithBpf},
      ext_modules=[Extension("rtml_ebpf._hot", ["rtml_ebpf/_hot.c"], optional=True)])
