"""stats().growth_bytes_per_s follows a process allocating at a known rate (within 10%), and
stats().seconds_to_limit is what is left divided by it; idle, there is no time to the limit."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
from support.cgroups import WORKLOADS, MiB, make_cgroup, needs_bpf, needs_cgroups

from rtml_ebpf import Limiter

pytestmark = pytest.mark.root



@needs_bpf
@needs_cgroups
@pytest.mark.parametrize("backend", ["ebpf", "poll"])
def test_growth_rate_within_10_percent_of_a_known_rate(backend: str) -> None:
    rate = 40 * MiB
    with make_cgroup(limit=1024 * MiB) as cg, Limiter(cg.directory, backend=backend, relief=False,
                                                       metric="usage") as lim:
        p = cg.popen([sys.executable, WORKLOADS, "grow", "--rate", str(rate), "--seconds", "4"],
                     stdout=subprocess.PIPE, bufsize=1)
        assert p.stdout is not None and p.stdout.readline().strip() == "go"
        rates, ttl = [], []
        t0 = time.monotonic()
        while time.monotonic() - t0 < 3.8:
            s = lim.stats()
            if time.monotonic() - t0 > 1.5 and s.growth_bytes_per_s is not None:
                rates.append(s.growth_bytes_per_s)
                ttl.append((s.seconds_to_limit, s.limit_headroom_bytes))
            time.sleep(0.05)
        assert p.stdout.readline().strip() == "done"
        t1 = time.monotonic()
        while time.monotonic() - t1 < 1.5:  # idle: the window fills with flat readings
            idle = lim.stats()
            time.sleep(0.05)
        p.kill()
        p.wait()
    rates.sort()
    median = rates[len(rates) // 2]
    assert abs(median - rate) / rate < 0.10, f"median {median / MiB:.1f} MiB/s of {rate / MiB} ({len(rates)} readings)"
    seconds, room = ttl[len(ttl) // 2]
    assert seconds is not None and room is not None and 5 < seconds < 60  # ~800 MiB left at 40 MiB/s
    assert idle.growth_bytes_per_s is not None and abs(idle.growth_bytes_per_s) < 2 * MiB
    assert idle.seconds_to_limit is None
