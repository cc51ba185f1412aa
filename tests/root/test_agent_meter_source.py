"""``Admission.stats().meter`` says the truth about the agent's thread meter (issue 19's review,
item 2): a real agent on a private socket, a real cgroup, the client as uid 65534."""

from __future__ import annotations

import json
import os

import pytest
from support.agent import NOBODY, AgentProcess, client_env, glob_for, nobody_python
from support.cgroups import MiB, make_cgroup, needs_bpf, needs_cgroups

pytestmark = [pytest.mark.root, needs_bpf, needs_cgroups]

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "support", "meter_source.py")


@pytest.mark.vm
def test_admission_stats_meter_says_agent_plus_rusage_while_threads_fall_back() -> None:
    """16 threads start requests at once; the meter asks the agent for 8 a second, so 8 are
    measured by getrusage: the meter says "agent+rusage" while they live (it said "agent"), its
    stats() count them and say why, and it says "agent" again once they have ended."""
    with make_cgroup(limit=256 * MiB) as cg:
        agent = AgentProcess(glob_for(cg))
        try:
            p = cg.popen([*NOBODY, nobody_python(), SCRIPT], env=client_env(agent))
            out, err = p.communicate(timeout=60)
        finally:
            agent.stop()
        assert p.returncode == 0, f"client exited {p.returncode}:\n{err[-3000:]}\nagent:\n{agent.text()[-3000:]}"
    r = json.loads(out.strip().splitlines()[-1])
    assert r["alone"] == "agent", r
    assert r["during"] == "agent+rusage", r
    st = r["during_stats"]
    assert st["source"] == "agent+rusage" and st["rusage_threads"] == 8, r
    assert list(st["rusage_why"]) == ["more than 8 new threads asked in a second (the agent's request rate)"], r
    assert r["after"] == "agent" and r["after_stats"]["rusage_threads"] == 0, r
