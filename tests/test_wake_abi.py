"""The wake record and its constants in rtml_ebpf/ebpf/abi.py agree with bpf/rtml.h (compiled
with the C compiler), as tests/test_abi.py checks the other structs; and the level word the
enforcer writes is the config's wake_pages."""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import pytest

from rtml_ebpf.ebpf import abi

HEADER = Path(__file__).resolve().parent.parent / "bpf" / "rtml.h"


def test_the_wake_record_matches_the_header(tmp_path: Path) -> None:
    cc = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        pytest.fail("no C compiler: scripts/setup.sh installs clang")
    lines = ['#include <stdio.h>', '#include <stddef.h>', '#include <linux/types.h>', f'#include "{HEADER}"',
             "int main(void) {", 'printf("size %zu\\n", sizeof(struct rtml_wake));']
    lines += [f'printf("{f} %zu\\n", offsetof(struct rtml_wake, {f}));' for f, _ in abi.Wake._fields_]
    lines += ['printf("config_wake %zu\\n", offsetof(struct rtml_config, wake_pages));',
              'printf("every %llu\\n", (unsigned long long)RTML_WAKE_EVERY_NS);',
              'printf("ring %llu\\n", (unsigned long long)RTML_WAKE_RING);', "return 0; }"]
    (tmp_path / "w.c").write_text("\n".join(lines))
    subprocess.run([cc, "-o", str(tmp_path / "w"), str(tmp_path / "w.c")], check=True)
    out = subprocess.run([str(tmp_path / "w")], check=True, capture_output=True, text=True).stdout
    c = {k: int(v) for k, v in (line.split() for line in out.splitlines())}
    assert c["size"] == ctypes.sizeof(abi.Wake)
    for f, _ in abi.Wake._fields_:
        assert c[f] == getattr(abi.Wake, f).offset, f
    assert c["config_wake"] == abi.Config.wake_pages.offset == abi.C_WAKE * 8
    assert c["every"] == abi.WAKE_EVERY_NS
    assert c["ring"] == abi.WAKE_RING
