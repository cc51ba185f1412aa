"""Levels, hysteresis, callbacks and relief, driven by real memory in real cgroups."""

from __future__ import annotations

import json
import textwrap

import pytest
from support.cgroups import MiB, make_cgroup, needs_bpf, needs_cgroups, wait_until

from rtml_ebpf import Level, Limiter, Stats

pytestmark = pytest.mark.root


@needs_bpf
@needs_cgroups
@pytest.mark.parametrize("backend", ["ebpf", "poll"])
def test_soft_hard_levels_and_hysteresis(backend: str) -> None:
    trips: list[Stats] = []
    clears: list[Stats] = []
    with make_cgroup(limit=128 * MiB) as cg:
        holder = cg.hold()
        with Limiter(cg.directory, backend=backend, metric="usage", threshold=0.5, soft_threshold=0.3,
                     hysteresis=0.1, poll_interval=0, relief=False, on_trip=trips.append,
                     on_clear=clears.append) as lim:
            assert lim.level() is Level.OK
            # Levels (of 128 MiB): soft trips at 38.4 and clears below 25.6; hard trips at 64 and
            # clears below 51.2. The holder's interpreter adds about 6 MiB to what it holds.
            base = cg.usage() // MiB
            holder.change(44 - base)  # ~44 MiB
            assert wait_until(lambda: lim.level() is Level.SOFT)
            assert not lim.is_mem_limit_reached()
            p = lim.pressure()
            assert 0.0 < p < 1.0
            shed = sum(lim.should_shed() for _ in range(4000)) / 4000  # probabilistic shedding
            assert abs(shed - p) < 0.1, (shed, p)
            holder.change(27)  # ~71 MiB: HARD
            assert wait_until(lambda: lim.level() is Level.HARD)
            assert lim.is_mem_limit_reached() and lim.should_shed() and lim.pressure() == 1.0
            holder.change(-10)  # ~61 MiB: below the trip point, above the clear point
            assert not wait_until(lambda: not lim.is_mem_limit_reached(), timeout=0.5)
            holder.change(-25)  # ~36 MiB: hard clears; soft holds by hysteresis though below 38.4
            assert wait_until(lambda: lim.level() is Level.SOFT)
            holder.change(-100)  # the interpreter only: all clear
            assert wait_until(lambda: lim.level() is Level.OK)
            s = lim.stats()
            assert s.trips >= 1 and s.soft_trips >= 1
            assert wait_until(lambda: len(clears) >= 1, timeout=2)  # the monitor saw it
            assert any(t.level in ("SOFT", "HARD") for t in trips)
            assert clears[-1].level == "OK"


RELIEF_CHILD = textwrap.dedent(
    """
    import gc, json, sys, time
    import rtml_ebpf
    gc.disable()  # cycles stay until something collects them: what relief is for
    relief = sys.argv[1] == "relief"
    lim = rtml_ebpf.Limiter(backend="ebpf", threshold=0.4, metric="usage", hysteresis=0.05,
                            relief=rtml_ebpf.relief.Relief(min_interval=0.5) if relief else False)
    class Node:
        pass
    nodes = []
    for _ in range(1800):  # ~112 MiB of 64 KiB buffers, each in a reference cycle
        n = Node(); n.me = n; n.data = bytearray(64 * 1024); n.data[::4096] = b"x" * 16
        nodes.append(n)
    tripped_before = lim.is_mem_limit_reached()
    del nodes, n  # dropped: only the cycles keep them
    deadline = time.monotonic() + 5
    while lim.is_mem_limit_reached() and time.monotonic() < deadline:
        time.sleep(0.02)
    # The check clears as soon as gc.collect() has freed the memory; the relief run is
    # counted when malloc_trim returns, a moment later. (A run may have happened already, while
    # the nodes were still held: the trip comes at 40% of the limit, before the loop ends; that
    # one freed nothing. Wait for the run that cleared the check to be counted.)
    while relief and lim.relief.stats.bytes_returned == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    s = lim.stats()
    print(json.dumps({"tripped_before": tripped_before, "tripped_after": lim.is_mem_limit_reached(),
                      "relief_runs": s.relief_runs, "relief_bytes": s.relief_bytes, "usage": s.usage_bytes}))
    """
)


@needs_bpf
@needs_cgroups
def test_relief_brings_a_process_that_dropped_references_back_below() -> None:
    import rtml_ebpf.relief  # noqa: F401 - the child imports it too

    with make_cgroup(limit=256 * MiB) as cg:
        with_relief = cg.run_python(["-c", RELIEF_CHILD, "relief"])
    with make_cgroup(limit=256 * MiB) as cg:
        without = cg.run_python(["-c", RELIEF_CHILD, "none"])
    assert with_relief["tripped_before"] and without["tripped_before"], (with_relief, without)
    assert with_relief["tripped_after"] is False, with_relief
    assert with_relief["relief_runs"] >= 1 and with_relief["relief_bytes"] > 50 * MiB, with_relief
    assert without["tripped_after"] is True, without
    assert without["relief_runs"] == 0
    assert json.dumps(without)
