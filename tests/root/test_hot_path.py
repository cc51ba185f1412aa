"""The eBPF hot path makes no system call: a million checks under strace, between two markers."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from support.cgroups import needs_bpf
from support.strace import marker_lines, syscalls_between

pytestmark = pytest.mark.root

CHILD = textwrap.dedent(
    """
    import os, sys, rtml_ebpf
    lim = rtml_ebpf.Limiter(backend=sys.argv[1], poll_interval=0.0, relief=False)
    check = lim.is_mem_limit_reached
    check()
    # The monitor thread (an eBPF limiter's once-a-second limit check) wakes every 50 ms and asks
    # for the GIL; the hand-overs are futex calls on this thread that are not the check's. As the
    # agent's hot-loop test does: no forced switch while the loop is measured.
    sys.setswitchinterval(100)
    os.getppid()  # marker: start
    for _ in range(int(sys.argv[2])):
        check()
    os.getppid()  # marker: end
    lim.close()
    """
)


def syscalls_between_markers(backend: str, n: int, tmp_path: Path) -> list[str]:
    if shutil.which("strace") is None:
        pytest.fail("strace is not installed; scripts/setup.sh installs it")
    log = tmp_path / f"strace-{backend}.txt"
    subprocess.run(["strace", "-f", "-qq", "-o", str(log), sys.executable, "-c", CHILD, backend, str(n)],
                   check=True, timeout=300)
    lines = log.read_text().splitlines()
    marks = marker_lines(lines)
    assert len(marks) == 2, f"markers not found in strace output ({len(marks)})"
    # Only the checking thread counts: the limiter's monitor thread sleeps in syscalls by design.
    tid = lines[marks[0]].split()[0]
    assert lines[marks[1]].split()[0] == tid
    return syscalls_between(lines, marks[0], marks[1], tid)


@needs_bpf
def test_a_million_ebpf_checks_make_no_syscall(tmp_path: Path) -> None:
    between = syscalls_between_markers("ebpf", 1_000_000, tmp_path)
    assert between == []


@needs_bpf
def test_the_strace_method_sees_poll_syscalls(tmp_path: Path) -> None:
    # The control: the same harness does see the poll backend read its files.
    between = syscalls_between_markers("poll", 200, tmp_path)
    assert sum("openat(" in line for line in between) >= 200


@needs_bpf
def test_the_kernel_fed_check_is_the_c_verdict() -> None:
    # What P1 measures: the bound check is one C call reading the slot's byte.
    import rtml_ebpf
    from rtml_ebpf._hot import Verdict

    with rtml_ebpf.Limiter(backend="ebpf", relief=False) as lim:
        check = lim.is_mem_limit_reached
        assert isinstance(check, Verdict)
        assert check() is False and lim.level().name == "OK"
    assert lim.is_mem_limit_reached() is False  # closed: the fail answer, not the dropped view


METER_GATE = textwrap.dedent("""
    import ctypes, json, mmap, rtml_ebpf
    from rtml_ebpf.ebpf import abi
    from rtml_ebpf.ebpf.runtime import Runtime

    def touch(n_mib):
        bufs = [mmap.mmap(-1, 1 << 20) for _ in range(n_mib)]
        for b in bufs:
            for off in range(0, len(b), 4096):
                b[off] = 1
        return bufs

    def meter_off(rt):
        ctl = abi.Ctl.from_buffer_copy(rt._loaded.maps["ctl"][: ctypes.sizeof(abi.Ctl)])
        return bool(ctl.flags & abi.CTL_METER_OFF)

    lim = rtml_ebpf.Limiter(backend="ebpf", relief=False)
    rt = Runtime.current()
    out = {"off_at_load": meter_off(rt)}
    raw = rt.thread_meter  # registered without asking the Limiter: the programs skip it
    base = raw.begin()
    held = touch(16)
    out["before"] = raw.read()[1] - base
    meter = lim.thread_meter()
    out["off_after"] = meter_off(rt)
    base = meter.begin()
    held += touch(16)
    out["after"] = meter.read()[1] - base
    print(json.dumps(out))
""")


@needs_bpf
def test_the_per_thread_meter_costs_nothing_until_asked_for() -> None:
    """The programs skip the thread meter's lookup (ctl flag METER_OFF, set at load) until a
    Limiter's thread_meter() is asked for (admission does); then they charge registered threads."""
    import json

    p = subprocess.run([sys.executable, "-c", METER_GATE], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads(p.stdout)
    assert out["off_at_load"] is True and out["before"] == 0, out
    assert out["off_after"] is False, out
    assert abs(out["after"] - (16 << 20)) <= 0.1 * (16 << 20), out
