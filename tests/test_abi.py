"""rtml_ebpf/ebpf/abi.py agrees with bpf/rtml.h on every size and offset (compiled with the C compiler)."""

from __future__ import annotations

import ctypes
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from rtml_ebpf.ebpf import abi as _abi

HEADER = Path(__file__).resolve().parent.parent / "bpf" / "rtml.h"
STRUCTS = {"rtml_rule": _abi.Rule, "rtml_config": _abi.Config, "rtml_ctl": _abi.Ctl, "rtml_slot": _abi.Slot,
           "rtml_counters": _abi.Counters, "rtml_thread": _abi.Thread, "rtml_beat": _abi.Beat,
           "rtml_publish_args": _abi.PublishArgs, "rtml_oom_event": _abi.OomEvent,
           "rtml_tentry": _abi.TEntry, "rtml_tpage": _abi.TPage, "rtml_tbegin": _abi.TBegin, "rtml_tref": _abi.TRef}


def c_layout(tmp_path: Path) -> dict[str, int]:
    cc = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        pytest.fail("no C compiler: scripts/setup.sh installs clang")
    lines = ['#include <stdio.h>', '#include <stddef.h>', '#include <linux/types.h>', f'#include "{HEADER}"',
             "int main(void) {"]
    for cname, py in STRUCTS.items():
        lines.append(f'printf("{cname} %zu\\n", sizeof(struct {cname}));')
        for field, _ in py._fields_:
            lines.append(f'printf("{cname}.{field} %zu\\n", offsetof(struct {cname}, {field}));')
    for const in ("RTML_ABI_VERSION", "RTML_MAX_SLOTS", "RTML_MAX_RULES", "RTML_MAX_THREADS",
                  "RTML_NESTED_WATCHES", "RTML_BEAT_MS", "RTML_PUBLISH_START_BEAT", "RTML_PUBLISH_RETIRE",
                  "RTML_EVENT_DEPTH", "RTML_EVENT_NAME", "RTML_EVENT_TRUNCATED", "RTML_EVENT_NAME_CUT",
                  "RTML_OOM_RING_LIBRARY", "RTML_TPAGE_ENTRIES", "RTML_TMETER_MAX"):
        lines.append(f'printf("{const} %llu\\n", (unsigned long long){const});')
    lines.append('printf("RTML_UNLIMITED_PAGES %llu\\n", (unsigned long long)RTML_UNLIMITED_PAGES);')
    lines.append("return 0; }")
    src = tmp_path / "layout.c"
    src.write_text("\n".join(lines))
    exe = tmp_path / "layout"
    subprocess.run([cc, "-o", str(exe), str(src)], check=True)
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
    return {k: int(v) for k, v in (line.split() for line in out.splitlines())}


def test_struct_layouts_match_the_header(tmp_path: Path) -> None:
    c = c_layout(tmp_path)
    for cname, py in STRUCTS.items():
        assert c[cname] == ctypes.sizeof(py), cname
        for field, _ in py._fields_:
            assert c[f"{cname}.{field}"] == getattr(py, field).offset, f"{cname}.{field}"
    assert c["RTML_ABI_VERSION"] == _abi.ABI_VERSION
    assert c["RTML_MAX_SLOTS"] == _abi.MAX_SLOTS
    assert c["RTML_MAX_RULES"] == _abi.MAX_RULES
    assert c["RTML_MAX_THREADS"] == _abi.MAX_THREADS
    assert c["RTML_NESTED_WATCHES"] == _abi.NESTED_WATCHES
    assert c["RTML_BEAT_MS"] == _abi.BEAT_MS
    assert c["RTML_PUBLISH_START_BEAT"] == _abi.PUBLISH_START_BEAT
    assert c["RTML_PUBLISH_RETIRE"] == _abi.PUBLISH_RETIRE
    assert c["RTML_UNLIMITED_PAGES"] == _abi.UNLIMITED_PAGES
    for const in ("EVENT_DEPTH", "EVENT_NAME", "EVENT_TRUNCATED", "EVENT_NAME_CUT", "OOM_RING_LIBRARY",
                  "TPAGE_ENTRIES", "TMETER_MAX"):
        assert c[f"RTML_{const}"] == getattr(_abi, const), const


def test_client_meter_page_is_one_page() -> None:
    # the agent lends it as a one-page map: a client maps exactly PAGE_SIZE of it
    assert ctypes.sizeof(_abi.TPage) == 4096
    assert ctypes.sizeof(_abi.TBegin) <= 4096


def test_slot_is_256_bytes_and_hot_bytes_come_first() -> None:
    assert ctypes.sizeof(_abi.Slot) == 256
    assert _abi.TRIPPED_OFFSET == 0


def test_enum_values_match_the_header() -> None:
    text = HEADER.read_text()
    for name, value in (("RTML_RULE_FRACTION", _abi.RULE_FRACTION), ("RTML_RULE_PAGES", _abi.RULE_PAGES),
                        ("RTML_METRIC_WORKING_SET", _abi.METRIC_WORKING_SET)):
        m = re.search(rf"{name} = (\d+)", text)
        assert m and int(m.group(1)) == value, name
    for name, value in (("RTML_CTL_TRACK_INACTIVE", _abi.CTL_TRACK_INACTIVE),
                        ("RTML_CTL_FAULT_REFRESH", _abi.CTL_FAULT_REFRESH),
                        ("RTML_CTL_METER_OFF", _abi.CTL_METER_OFF),
                        ("RTML_SLOT_STALLING", _abi.SLOT_STALLING)):
        m = re.search(rf"#define {name} (\d+)", text)
        assert m and int(m.group(1)) == value, name
