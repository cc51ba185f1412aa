"""Compiles the BPF object (scripts/build_bpf.py) when the package is built or installed, and
the optional C hot-path check (rtml_ebpf/_hot.c; without a compiler or Python headers the
package uses a functools.partial instead).

_hot is built against the limited API of CPython 3.10, so one wheel (cp310-abi3) serves every
supported Python; the sdist carries the compiled BPF object, so a build from it needs clang only
to rebuild that object (see docs/packaging.md)."""

from __future__ import annotations

import os
import sys

from setuptools import Extension, setup
from setuptools.command.build_py import build_py
from setuptools.command.sdist import sdist

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "scripts"))
from build_bpf import ensure_bpf  # noqa: E402

BPF_OUT = os.path.join(HERE, "rtml_ebpf", "bpf")
LIMITED_API = 0x030A0000  # the oldest supported Python (requires-python), hence the cp310-abi3 tag


class BuildWithBpf(build_py):
    def run(self) -> None:
        ensure_bpf(BPF_OUT)  # before the copy: the object is package data
        super().run()


class SdistWithBpf(sdist):
    def run(self) -> None:
        ensure_bpf(BPF_OUT)  # the sdist ships the object (MANIFEST.in) for builds without clang
        super().run()


setup(cmdclass={"build_py": BuildWithBpf, "sdist": SdistWithBpf},
      ext_modules=[Extension("rtml_ebpf._hot", ["rtml_ebpf/_hot.c"], optional=True, py_limited_api=True,
                             define_macros=[("Py_LIMITED_API", hex(LIMITED_API))],
                             # _hot calls nothing in libc, so the linker would drop it and
                             # auditwheel could not tell which libc (hence manylinux) it is for.
                             extra_link_args=["-Wl,--no-as-needed", "-lc"])],
      options={"bdist_wheel": {"py_limited_api": "cp310"}})
