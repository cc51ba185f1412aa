"""An ``async def`` endpoint whose allocation is a surprise (issue 19, adversarial review D10): a
FastAPI route under ``uvicorn --workers 2`` in a real 256 MiB cgroup, flooded by 48 clients, 90% of
them asking 8 MiB and 10% asking 80 MiB of the same route (tests/support/surprise_app.py). The 80
MiB is built on the event loop with no await in between, so the request's coroutine has no next
step until it is done: the enforcer must see the step's growth while it runs and end it in the
loop's thread. Control: unguarded, the same flood OOM-kills it. Guarded: no OOM kill, no worker
lost, requests served, and the surprises ended with the enforcer's 503."""

from __future__ import annotations

import os
import sys

import pytest
from support.cgroups import MiB, needs_bpf, needs_cgroups

from rtml_ebpf.demo.flood import Flood, Server

pytestmark = [pytest.mark.root, needs_bpf, needs_cgroups]

SUPPORT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "support")
ENV = {"RTML_THRESHOLD": "0.8", "RTML_METRIC": "usage", "PYTHONPATH": SUPPORT}
MIX = ((0.9, "GET", "/async?mib=8", 0), (0.1, "GET", "/async?mib=80", 0))


def server(guard: str) -> Server:
    argv = (sys.executable, "-m", "uvicorn", "--host", "127.0.0.1", "--port", "{port}", "--workers", "2",
            "--log-level", "warning", "--no-access-log", "surprise_app:app")
    return Server(argv, tuple({**ENV, "RTML_DEMO_GUARD": guard}.items()))


@pytest.mark.parametrize("guard", ["none", "admission"])
def test_an_async_endpoint_ten_times_its_estimate_is_ended_on_the_loop(guard: str) -> None:
    r = Flood(guard, guard, server(guard), limit=256 * MiB, duration=10.0, clients=48, mix=MIX).run()
    if guard == "none":
        assert r.oom_kills >= 1, r
        return
    assert r.oom_kills == 0, r
    assert r.restarts == 0, r
    assert r.served >= 20, r
    assert r.ended >= 1, r  # the surprises were ended (503), not the process
