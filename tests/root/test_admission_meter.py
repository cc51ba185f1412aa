"""The kernel-fed per-request cost: what the BPF programs charge to each thread of a process
in a watched cgroup, read without a syscall."""

from __future__ import annotations

from pathlib import Path

import pytest
from support.cgroups import WORKLOADS, MiB, make_cgroup, needs_bpf, needs_cgroups

pytestmark = [pytest.mark.root, needs_bpf, needs_cgroups]


def test_each_thread_and_each_async_request_is_charged_its_own_memory(tmp_path: Path) -> None:
    with make_cgroup(limit=256 * MiB) as cg:
        out = cg.run_python([WORKLOADS, "cost", str(tmp_path)])  # concurrent threads, interleaved asyncio
    assert out["source"] == "ebpf"
    assert len(out["threads"]) == 5 and len(out["async"]) == 2
    for key, (allocated, measured) in {**out["threads"], **out["async"]}.items():
        assert measured is not None, key
        assert abs(measured - allocated) <= 0.1 * allocated, (key, measured, allocated)


def test_an_unprivileged_agent_client_is_charged_by_the_kernel_meter(tmp_path: Path) -> None:
    """The same requests, as uid 65534 through the node agent: the agent's meter pages, not
    getrusage (which would miss the frees: a request's cost is its peak either way, but a huge
    page or a file charge would be off)."""
    import os

    from support.agent import NOBODY, AgentProcess, client_env, glob_for, nobody_python

    ledger = tmp_path / "ledger"
    ledger.mkdir()
    os.chmod(tmp_path, 0o755)
    os.chmod(ledger, 0o777)
    with make_cgroup(limit=256 * MiB) as cg:
        agent = AgentProcess(glob_for(cg))
        try:
            p = cg.popen([*NOBODY, nobody_python(), WORKLOADS, "cost", str(ledger), "--backend", "agent"],
                         env=client_env(agent))
            stdout, stderr = p.communicate(timeout=120)
        finally:
            agent.stop()
    assert p.returncode == 0, stderr[-3000:]
    import json

    out = json.loads(stdout.strip().splitlines()[-1])
    assert out["source"] == "agent", out
    # every request thread (and the asyncio one) got an entry of the agent's page: none fell back to getrusage
    assert out["meter_stats"]["registered"] >= 6 and out["meter_stats"]["refused"] == 0, out
    assert len(out["threads"]) == 5 and len(out["async"]) == 2
    for key, (allocated, measured) in {**out["threads"], **out["async"]}.items():
        assert measured is not None, key
        assert abs(measured - allocated) <= 0.1 * allocated, (key, measured, allocated)


def test_a_forked_child_meters_its_own_thread_not_the_parents_entry() -> None:
    """A thread that registered and then forked: in the child it is another thread (another tid),
    so it must register afresh; reading the parent's entry it would see none of its own charges.
    And the child dropping the parent's thread-locals must not unregister the parent's threads."""
    import os

    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "support", "meter_fork.py")
    with make_cgroup(limit=256 * MiB) as cg:
        out = cg.run_python([script])
    assert abs(out["child"]["grew"] - 32 * MiB) <= 0.1 * 32 * MiB, out
    assert abs(out["parent_grew"] - 16 * MiB) <= 0.1 * 16 * MiB, out
