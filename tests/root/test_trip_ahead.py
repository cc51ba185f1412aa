"""trip_ahead_ms, for real: a process allocating at a known rate towards a real limit trips a
Limiter whose threshold is far above it, while the limit is that close at that rate; it
clears once the growth stops. The OOM killer never acts."""

from __future__ import annotations

import subprocess
import sys

import pytest
from support.cgroups import WORKLOADS, MiB, make_cgroup, needs_bpf, needs_cgroups, wait_until

from rtml_ebpf import ConfigError, Limiter

pytestmark = pytest.mark.root


@needs_bpf
@needs_cgroups
@pytest.mark.parametrize("backend", ["ebpf", "poll"])
def test_trips_while_the_limit_is_that_close_at_the_current_rate(backend: str) -> None:
    limit, rate = 512 * MiB, 50 * MiB
    with make_cgroup(limit=limit) as cg, Limiter(cg.directory, threshold=0.99, trip_ahead_ms=3000, backend=backend,
                                                  relief=False, metric="usage") as lim:
        assert not lim.is_mem_limit_reached()
        # grows at 50 MiB/s and stops at 360 MiB: from about 362 MiB used (150 MiB left) the
        # limit is 3 s away, so it trips on the way up, far below the 99% threshold
        p = cg.popen([sys.executable, WORKLOADS, "grow", "--rate", str(rate), "--cap", str(360 * MiB)],
                     stdout=subprocess.PIPE, bufsize=1)
        assert p.stdout is not None and p.stdout.readline().strip() == "go"
        check = lim.is_mem_limit_reached
        assert wait_until(check, timeout=15, interval=0.01), lim.stats()
        at_trip = lim.stats()
        assert p.stdout.readline().strip() == "done"
        # flat: the rate falls to nothing over the next second and the flag clears
        assert wait_until(lambda: not check(), timeout=5), lim.stats()
        cleared = lim.stats()
        p.kill()
        p.wait()
        assert cg.oom_kills() == 0
    assert at_trip.tripped and at_trip.tripped_ahead and at_trip.level == "HARD"
    assert at_trip.usage_bytes < 0.8 * limit, at_trip  # the kernel verdict (99%) was nowhere near
    assert at_trip.seconds_to_limit is not None and at_trip.seconds_to_limit <= 3.0 * 1.5
    assert not cleared.tripped_ahead and cleared.level == "OK"


def test_trip_ahead_is_checked() -> None:
    for bad in (0, -5, True, "fast", 10**9):
        with pytest.raises(ConfigError, match="trip_ahead_ms"):
            Limiter(trip_ahead_ms=bad, backend="poll")  # type: ignore[arg-type]
