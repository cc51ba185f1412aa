"""The lean hook set's fault step (bpf/rtml.bpf.c, fault_refresh): far from every level a CPU
reads the page counter on one fault in 8 and only counts the others; near a level, even 2 MiB
THP faults must not carry a cgroup past its threshold unseen, the faults it only counted still
reach the counters, and the per-thread meter still gets every fault."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from support.cgroups import WORKLOADS, Cgroup, MiB, make_cgroup, needs_bpf, needs_cgroups

pytestmark = [pytest.mark.root, needs_bpf, needs_cgroups]

NCPU = os.cpu_count() or 1
BATCH = 64 * 4096 * NCPU  # MEMCG_CHARGE_BATCH pages per CPU
STEP = 8  # RTML_FAULT_STEP
LEAN = {**os.environ, "RTML_HOOKS": "lean", "RTML_SHARED": "0"}

# Runs inside the cgroup: touches one byte per `stride` of a 2 MiB-aligned private region (with a
# 2 MiB stride THP is asked for, MADV_HUGEPAGE: one 2 MiB fault per touch where the kernel gives
# huge pages; else refused, one fault per 4 KiB page) and checks the verdict after each touch, as a
# service would between allocations.
CHILD = r"""
import ctypes, json, mmap, sys
from rtml_ebpf import Limiter

threshold, stride, total = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
HUGE = 2 << 20
lim = Limiter(threshold=threshold, metric="usage", backend="ebpf")
usage_file = lim.cgroup.directory + ("/memory.current" if lim.cgroup.version == 2 else "/memory.usage_in_bytes")
faults_before = lim.stats().faults or 0
m = mmap.mmap(-1, total + HUGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
m.madvise(mmap.MADV_HUGEPAGE if stride == HUGE else mmap.MADV_NOHUGEPAGE)
addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
start = (-addr) % HUGE
flip = None
touched = 0
for off in range(start, start + total, stride):
    m[off] = 1
    touched += 1
    if flip is None and lim.is_mem_limit_reached():
        with open(usage_file) as f:
            flip = int(f.read())
        if stride == HUGE:
            break
huge = 0
with open("/proc/self/smaps_rollup") as f:
    for line in f:
        if line.startswith("AnonHugePages:"):
            huge = int(line.split()[1]) * 1024
print(json.dumps({"hooks": list(lim.stats().hooks), "usage_at_flip": flip, "touched": touched,
                  "faults": (lim.stats().faults or 0) - faults_before, "huge_bytes": huge}))
lim.close()
"""


def run_child(cg: Cgroup, threshold: int, stride: int, total: int) -> dict[str, Any]:
    p = cg.popen([sys.executable, "-c", CHILD, str(threshold), str(stride), str(total)], env=LEAN)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0, err[-3000:]
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    assert set(result["hooks"]) <= {"page_fault_user", "page_alloc", "oom_victim"}
    assert "page_fault_user" in result["hooks"]
    return result


def test_huge_faults_near_the_threshold_are_each_read() -> None:
    # 2 MiB per fault: skipping 7 of them would overshoot by 14 MiB; near the level every fault
    # reads, so the flip comes one fault after the crossing charge, as without the step (the
    # program runs before its fault is charged): at most two faults' worth past the threshold.
    with make_cgroup(limit=256 * MiB) as cg:
        threshold = 64 * MiB
        out = run_child(cg, threshold, 2 * MiB, 160 * MiB)
        assert out["huge_bytes"] > 0, f"the kernel gave no huge page (transparent_hugepage=never?): {out}"
        assert out["usage_at_flip"] is not None, out
        assert out["usage_at_flip"] - threshold <= 2 * 2 * MiB + BATCH, out
        assert cg.oom_kills() == 0


def test_small_faults_far_from_the_threshold_are_all_counted() -> None:
    # 4 KiB faults far below the threshold: most are only counted in this CPU's cache entry; they
    # reach the cgroup's counters at the next read, so at most 7 per CPU are missing when read.
    with make_cgroup(limit=256 * MiB) as cg:
        pages = 48 * MiB // 4096
        out = run_child(cg, 200 * MiB, 4096, 48 * MiB)
        assert out["usage_at_flip"] is None, out
        assert out["touched"] == pages
        assert out["faults"] >= pages - (STEP - 1) * NCPU, out
        assert out["faults"] <= pages + 4096, out  # the interpreter's own faults besides


def test_the_thread_meter_gets_every_fault_under_the_lean_set(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RTML_HOOKS", "lean")
    monkeypatch.setenv("RTML_SHARED", "0")
    with make_cgroup(limit=256 * MiB) as cg:
        out = cg.run_python([WORKLOADS, "cost", str(tmp_path)])
    assert out["source"] == "ebpf"
    for key, (allocated, measured) in {**out["threads"], **out["async"]}.items():
        assert measured is not None, key
        assert abs(measured - allocated) <= 0.1 * allocated, (key, measured, allocated)


# Pinned to CPU 0 and yielding every 256 KiB, two of these take turns on one CPU: its cache entry
# changes memcg at every turn, so each turn flushes the faults it only counted.
TOUCH = r"""
import mmap, os, sys
os.sched_setaffinity(0, {0})
total = int(sys.argv[1])
m = mmap.mmap(-1, total, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
m.madvise(mmap.MADV_NOHUGEPAGE)
for off in range(0, total, 4096):
    m[off] = 1
    if off % (256 << 10) == 0:
        os.sched_yield()
print("held", flush=True)
sys.stdin.readline()
"""


def test_two_watched_cgroups_taking_turns_on_one_cpu_keep_their_own_faults_and_verdicts(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RTML_HOOKS", "lean")
    monkeypatch.setenv("RTML_SHARED", "0")
    from rtml_ebpf import Limiter

    total = 48 * MiB
    pages = total // 4096
    with make_cgroup(limit=256 * MiB) as a, make_cgroup(limit=256 * MiB) as b, \
            Limiter(a.directory, backend="ebpf", metric="usage", threshold=16 * MiB) as la, \
            Limiter(b.directory, backend="ebpf", metric="usage", threshold=200 * MiB) as lb:
        before = {"a": la.stats().faults or 0, "b": lb.stats().faults or 0}
        procs = {name: cg.popen([sys.executable, "-c", TOUCH, str(total)], stdin=subprocess.PIPE)
                 for name, cg in (("a", a), ("b", b))}
        try:
            for p in procs.values():
                assert p.stdout is not None and p.stdout.readline().strip() == "held"
            faults = {"a": (la.stats().faults or 0) - before["a"], "b": (lb.stats().faults or 0) - before["b"]}
            for name, n in faults.items():
                assert pages - (STEP - 1) * NCPU <= n <= pages + 4096, (name, n, pages)
            # a holds 48 MiB past its 16 MiB threshold, b 48 MiB under its 200 MiB
            assert la.is_mem_limit_reached() is True
            assert lb.is_mem_limit_reached() is False
        finally:
            for p in procs.values():
                p.kill()
                p.wait()
