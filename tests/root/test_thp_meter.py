"""The fault-counting meter and transparent huge pages (bpf/rtml.bpf.c, handle_page_alloc): one
2 MiB fault is 512 pages, not one. A metered thread fills one 64 MiB buffer with THP asked for
(MADV_HUGEPAGE on a 2 MiB-aligned mapping, one memset as a bytearray's allocation does), and the
meter must read it within 10%. Before the page allocator's hook, the lean set read 32 faults:
128 KiB. In-process (the library's meter) and through the node agent (a client's meter, as uid
65534), with the lean set and with what this kernel attaches by default. And the bound on a
huge page the cgroup cannot take: allocated, counted, its charge refused, its range faulted in
small pages; counted once, never again for that range."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import pytest
from support.agent import NOBODY, AgentProcess, client_env, glob_for, nobody_python
from support.cgroups import Cgroup, MiB, make_cgroup, needs_bpf, needs_cgroups

pytestmark = [pytest.mark.root, needs_bpf, needs_cgroups]

SIZE = 64 * MiB

# Runs in the cgroup: argv[1] the backend ("ebpf" or "agent"). Prints the meter's reading of the fill.
CHILD = r"""
import ctypes, json, mmap, sys
from rtml_ebpf import Limiter

backend, size = sys.argv[1], int(sys.argv[2])
HUGE = 2 << 20
lim = Limiter(backend=backend, threshold=0.9, metric="usage", relief=False)
meter = lim.thread_meter()
m = mmap.mmap(-1, size + HUGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
m.madvise(mmap.MADV_HUGEPAGE)
addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
start = addr + (-addr) % HUGE
begin = meter.begin()
ctypes.memset(start, 1, size)  # one C call touches it all, as bytearray(n) does
net, peak = meter.read()
huge = 0
with open("/proc/self/smaps_rollup") as f:
    for line in f:
        if line.startswith("AnonHugePages:"):
            huge = int(line.split()[1]) * 1024
print(json.dumps({"hooks": list(lim.stats().hooks), "source": getattr(meter, "source", None),
                  "grew": net - begin, "peak": peak - begin, "huge_bytes": huge}))
lim.close()
"""


def check_reading(out: dict[str, Any], hook_set: str) -> None:
    # Huge pages are what this is about: with none (THP off, or memory too fragmented) the
    # reading proves nothing, and the test says so rather than passing.
    assert out["huge_bytes"] >= SIZE // 2, f"the kernel gave {out['huge_bytes']} bytes of huge pages: {out}"
    hooks = set(out["hooks"])
    if "memcg_lruvec" in hooks:
        assert "page_alloc" not in hooks, out  # the memcg events meter every charge at its size
    else:
        assert {"page_fault_user", "page_alloc"} <= hooks, out
    if hook_set == "lean":
        assert "memcg_lruvec" not in hooks, out
    assert abs(out["grew"] - SIZE) <= 0.1 * SIZE, out
    assert abs(out["peak"] - SIZE) <= 0.1 * SIZE, out


def run(cg: Cgroup, argv: list[str], env: dict[str, str], agent: AgentProcess | None = None) -> dict[str, Any]:
    p = cg.popen(argv, env=env)
    out, err = p.communicate(timeout=120)
    if p.returncode != 0:
        raise AssertionError(f"child exited {p.returncode}; stderr:\n{err[-3000:]}"
                             + (f"\nagent log:\n{agent.text()[-3000:]}" if agent else ""))
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result


@pytest.mark.vm
@pytest.mark.parametrize("hook_set", ["lean", "auto"])
def test_the_library_meter_counts_a_huge_page_at_its_size(hook_set: str) -> None:
    env = {**os.environ, "RTML_HOOKS": hook_set, "RTML_SHARED": "0"}
    with make_cgroup(limit=256 * MiB) as cg:
        out = run(cg, [sys.executable, "-c", CHILD, "ebpf", str(SIZE)], env)
        assert out["source"] == "ebpf", out
        check_reading(out, hook_set)
        assert cg.oom_kills() == 0


@pytest.mark.vm
@pytest.mark.parametrize("hook_set", ["lean", "auto"])
def test_an_agent_client_meter_counts_a_huge_page_at_its_size(hook_set: str) -> None:
    with make_cgroup(limit=256 * MiB) as cg:
        agent = AgentProcess(glob_for(cg), extra=("--hooks", hook_set))
        try:
            out = run(cg, [*NOBODY, nobody_python(), "-c", CHILD, "agent", str(SIZE)], client_env(agent), agent)
        finally:
            agent.stop()
        assert out["source"] == "agent", out
        check_reading(out, hook_set)
        assert cg.oom_kills() == 0


# Started outside the cgroup (argv[2]) so that the interpreter's file pages are charged to the test's
# own cgroup, not to this one: it imports, watches the cgroup, then moves in. There, with only its
# anonymous pages charged (no swap: nothing to reclaim), it fills small pages to about 1 MiB under
# the limit (argv[1]), then touches 512 KiB of one 2 MiB range with THP asked for: the kernel
# allocates the huge page, its charge fails, the range falls back to small pages.
NO_ROOM = r"""
import ctypes, json, mmap, os, sys
from rtml_ebpf import Limiter

limit, directory = int(sys.argv[1]), sys.argv[2]
HUGE = 2 << 20
lim = Limiter(directory, backend="ebpf", threshold=0.99, metric="usage", relief=False)
meter = lim.thread_meter()
usage_file = directory + ("/memory.current" if lim.cgroup.version == 2 else "/memory.usage_in_bytes")
hold = mmap.mmap(-1, limit, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
hold.madvise(mmap.MADV_NOHUGEPAGE)
m = mmap.mmap(-1, 2 * HUGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
m.madvise(mmap.MADV_HUGEPAGE)
addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
start = (-addr) % HUGE
with open(directory + "/cgroup.procs", "w") as f:
    f.write(str(os.getpid()))

def usage():
    with open(usage_file) as f:
        return int(f.read())

off = 0
while usage() < limit - (1 << 20) - (256 << 10):
    for _ in range(64):
        hold[off] = 1
        off += 4096
room = limit - usage()
begin = meter.begin()
touched = 0
for o in range(start, start + (512 << 10), 4096):
    m[o] = 1
    touched += 1
net, _ = meter.read()
huge = None  # this mapping's huge pages (the process has others where THP is "always")
with open("/proc/self/smaps") as f:
    inside = False
    for line in f:
        if "-" in line.split()[0] and not line.split()[0].endswith(":"):
            lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
            inside = lo <= addr < hi
        elif inside and line.startswith("AnonHugePages:"):
            huge = int(line.split()[1]) * 1024
print(json.dumps({"hooks": list(lim.stats().hooks), "room": room, "touched": touched,
                  "metered": (net - begin) // 4096, "huge_bytes": huge}))
"""


@pytest.mark.vm
def test_a_huge_page_the_cgroup_refuses_is_counted_once() -> None:
    env = {**os.environ, "RTML_HOOKS": "lean", "RTML_SHARED": "0"}
    with make_cgroup(limit=64 * MiB) as cg:
        p = subprocess.Popen([sys.executable, "-c", NO_ROOM, str(64 * MiB), cg.directory], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        stdout, err = p.communicate(timeout=120)
        assert p.returncode == 0, err[-3000:]
        out = json.loads(stdout.strip().splitlines()[-1])
        assert "page_alloc" in out["hooks"], out
        # the charge was refused (under 2 MiB of room, nothing to reclaim): small pages, one each
        assert out["huge_bytes"] == 0 and out["room"] < 2 * MiB, out
        # the refused huge page adds its 511 once; the next 127 faults in its range add one each
        assert out["touched"] <= out["metered"] <= out["touched"] + 511 + 16, out
        assert cg.oom_kills() == 0
