"""The kernel wakes the enforcer (issue 19, item 3), on the real programs in a real 256 MiB
cgroup: a request declared at 8 MiB that grows at ~500 MiB/s is ended by the enforcer when the
programs' wake record names its thread, with the backstop look made longer than the run, so no
poll can end it in time; the three other requests complete and the process lives. The control,
without the wake and with polls as rare, is OOM-killed. Once nothing is in flight the wake level
is 0 (the programs' cost is a compare again)."""

from __future__ import annotations

import json
import os
import sys

import pytest
from support.cgroups import MiB, make_cgroup, needs_bpf, needs_cgroups
from support.shared import shared_place

from rtml_ebpf.config import PAGE_SIZE

pytestmark = [pytest.mark.root, needs_bpf, needs_cgroups]

CHILD = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "support", "wake_child.py")


def run_child(mode: str, env: dict[str, str] | None = None) -> tuple[int, dict[str, object] | None, int, str]:
    """(exit status, its JSON line or None, the cgroup's OOM kills, stderr) of wake_child.py in a
    256 MiB cgroup."""
    with make_cgroup(limit=256 * MiB) as cg:
        p = cg.popen([sys.executable, CHILD, mode], env=None if env is None else {**os.environ, **env})
        out, err = p.communicate(timeout=120)
        kills = cg.oom_kills()
    lines = out.strip().splitlines()
    return p.returncode, json.loads(lines[-1]) if p.returncode == 0 and lines else None, kills, err[-3000:]


@pytest.mark.vm
def test_the_kernels_wake_ends_the_overrun_before_the_oom_killer() -> None:
    rc, got, kills, err = run_child("wake")
    assert rc == 0 and kills == 0, (rc, kills, err)
    assert got is not None
    outcomes, tids = got["outcomes"], got["tids"]
    assert outcomes == {"overrun": "ended", "small0": "completed", "small1": "completed",
                        "small2": "completed"}, got
    assert got["ended_total"] == 1, got
    # The look that ended it was the kernel's: a record naming the overrunning thread.
    assert isinstance(got["woken"], int) and got["woken"] >= 1, got
    assert isinstance(tids, dict) and isinstance(got["wake_tids"], list)
    assert tids["overrun"] in got["wake_tids"], got
    assert got["waker"] == "Waker" and got["backend"] == "ebpf", got
    # The level while requests ran sat below the limit's critical band; once none runs it is 0.
    assert isinstance(got["level_in_flight"], int) and isinstance(got["limit_bytes"], int)
    assert 0 < got["level_in_flight"] * PAGE_SIZE < got["limit_bytes"], got
    assert got["level_idle"] == 0, got


def test_the_control_without_the_wake_is_oom_killed() -> None:
    # The same requests with no kernel wake and the poll as rare as the backstop above: the
    # overrun reaches the limit first. What the test above would see if the wake did nothing.
    rc, _, kills, err = run_child("nowake")
    assert rc == -9 and kills >= 1, (rc, kills, err)


# Not in the VMs: under software emulation the agent's Python loop and the socket hop it
# forwards over slow down far more than the overrun's page faults do (the backports VM saw 1
# OOM kill); the kernel's part, the ring and its records, runs there in the test above, on
# both kernels.
def test_through_the_agent_the_wake_ends_the_overrun() -> None:
    # The same requests in a client of the node's shared load: the agent consumes the ring and
    # forwards this cgroup's records on the client's wake connection, the charging thread named
    # in the client's own numbering; the level it wrote is 0 again once nothing is in flight.
    with shared_place() as place:
        rc, got, kills, err = run_child("agent", place.env)
    assert rc == 0 and kills == 0, (rc, kills, err, place.log()[-2000:])
    assert got is not None and got["backend"] == "agent" and got["waker"] == "AgentWaker", got
    assert got["outcomes"] == {"overrun": "ended", "small0": "completed", "small1": "completed",
                               "small2": "completed"}, got
    tids = got["tids"]
    assert isinstance(tids, dict) and isinstance(got["wake_tids"], list)
    assert tids["overrun"] in got["wake_tids"], got
    assert isinstance(got["level_in_flight"], int) and isinstance(got["limit_bytes"], int)
    assert 0 < got["level_in_flight"] * PAGE_SIZE < got["limit_bytes"], got
    assert got["level_idle"] == 0, got
