"""A pre-fork worker's round trips to the node agent go on a connection of its own (issue 19's
review, item 1): a real agent on a private socket, a real cgroup, the client as uid 65534."""

from __future__ import annotations

import json
import os

import pytest
from support.agent import NOBODY, AgentProcess, client_env, glob_for, nobody_python
from support.cgroups import MiB, make_cgroup, needs_bpf, needs_cgroups

pytestmark = [pytest.mark.root, needs_bpf, needs_cgroups]

FORK_STATS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "support", "fork_stats.py")


def run_fork_stats(*flags: str) -> dict:
    with make_cgroup(limit=256 * MiB) as cg:
        agent = AgentProcess(glob_for(cg))
        try:
            p = cg.popen([*NOBODY, nobody_python(), FORK_STATS, *flags], env=client_env(agent))
            out, err = p.communicate(timeout=90)
        finally:
            agent.stop()
        assert p.returncode == 0, f"client exited {p.returncode}:\n{err[-3000:]}\nagent:\n{agent.text()[-3000:]}"
        return json.loads(out.strip().splitlines()[-1])


@pytest.mark.vm
def test_forked_workers_and_their_parent_ask_stats_at_once_each_on_its_own_connection() -> None:
    """Parent and 3 forked workers ask for the counters at the same instants, 20 times each:
    every ask gets its reply within the timeout (asked on the parent's lease, the replies cross:
    one process reads another's and the other waits 1 s for nothing), and the parent's lease
    stays open (the agent was never asked past its rate on one connection)."""
    r = run_fork_stats()
    procs = [r["parent"], *r["workers"]]
    assert len({p.get("pid") for p in procs}) == 4, r
    for p in procs:
        assert "error" not in p, r
        assert p["missing"] == 0 and p["slowest"] < 0.5 and p["monotonic"] and p["lost"] is None, r
    assert r["lease_open"] and r["after"], r


@pytest.mark.vm
def test_a_wake_connection_made_before_a_fork_stays_the_parents() -> None:
    """The enforcer keeps its waker: a forked child's copy of the wake connection is closed, so
    its use fails (the enforcer then asks for a wake of its own, which works), and the parent's
    goes on (before, both processes set the one level and read each other's wake records)."""
    r = run_fork_stats("--wake")
    child, parent = r["child"], r["parent"]
    assert child["inherited_open"] is False, r
    assert "the agent's wake connection failed" in child["inherited_use"], r
    assert child["own_open"] is True and child["own_wait"] == [], r
    assert parent == {"open": True, "wait": []}, r
