"""The agent's ``wake`` op (issue 19, item 3) against a running agent: an honest wake connection
gets the records of its cgroup (a thread that is not the client's is not named); a bad level, an
unwatched cgroup or another op on a wake connection is refused with what was wrong (the level the
programs compare with, and its return to 0, are checked in tests/root/test_enforcer_wake.py); and
structure-aware fuzzing of the op, fresh and on an established wake connection, leaves the agent
alive, bounded and still waking an honest client."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support.agent import AgentProcess, glob_for
from support.cgroups import Cgroup, MiB, make_cgroup, needs_bpf, needs_cgroups

from rtml_ebpf import _cgroup

pytestmark = [needs_bpf, needs_cgroups, pytest.mark.root]

FIELDS = ["v", "op", "level", "scope", "cgroup", "pid", "cgroup_id", "rules"]
scalars = (st.none() | st.booleans() | st.integers(min_value=-(1 << 70), max_value=1 << 70)
           | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=20)
           | st.sampled_from(["wake", "watch", "stats", "events", "self", "pod", "/", "/sys/fs/cgroup", "\ud800"]))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                      | st.dictionaries(st.sampled_from(FIELDS), inner, max_size=3), max_leaves=10)
wake_messages = st.fixed_dictionaries({"op": st.just("wake")}, optional={
    "v": st.sampled_from([1, 2, "1", None]), "level": values, "scope": values, "cgroup": values,
    "pid": values, "junk": values})


@pytest.fixture(scope="module")
def agent() -> Iterator[AgentProcess]:
    with make_cgroup(limit=128 * MiB) as cg:
        a = AgentProcess(glob_for(cg))
        a.cg = cg  # type: ignore[attr-defined]
        try:
            yield a
        finally:
            a.stop()


def connect(agent: AgentProcess) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.settimeout(3)
    s.connect(agent.socket)
    return s


def open_wake(agent: AgentProcess, cg: Cgroup, level: int) -> tuple[socket.socket, dict[str, object]]:
    """A wake connection on ``cg`` (root names it by its directory, as a root watch does)."""
    s = connect(agent)
    s.send(json.dumps({"v": 1, "op": "wake", "level": level, "cgroup": cg.directory}).encode())
    return s, json.loads(s.recv(4096))


def records(s: socket.socket, timeout: float) -> list[dict[str, object]]:
    s.settimeout(timeout)
    out = []
    try:
        while True:
            out.append(json.loads(s.recv(4096)))
            s.settimeout(0.05)
    except (TimeoutError, BlockingIOError):
        return out


def honest_wake(agent: AgentProcess) -> None:
    cg: Cgroup = agent.cg  # type: ignore[attr-defined]
    cgid = _cgroup.cgroup_from_directory(cg.directory).cgroup_id
    s, reply = open_wake(agent, cg, 8 * MiB)
    try:
        assert reply == {"ok": True, "cgroup_id": cgid}, reply
        h = cg.hold()
        try:
            h.change(24)
            got = records(s, 3)
        finally:
            h.proc.kill()
            h.proc.wait()
        assert got, agent.text()[-2000:]
        for r in got:
            assert r["cgroup_id"] == cgid, r
            assert isinstance(r["used"], int) and r["used"] >= r["level"] == 8 * MiB, r
            assert r["tid"] == 0, r  # the holder's thread is not this client's: not named
    finally:
        s.close()


def test_an_honest_wake_gets_its_cgroups_records(agent: AgentProcess) -> None:
    honest_wake(agent)


def test_a_wake_on_an_unwatched_cgroup_or_with_a_bad_level_is_refused(agent: AgentProcess) -> None:
    cg: Cgroup = agent.cg  # type: ignore[attr-defined]
    for bad in (-1, 1 << 60, "8", 1.5, True, None):
        s, reply = open_wake(agent, cg, bad)  # type: ignore[arg-type]
        s.close()
        assert reply["ok"] is False and "level=" in str(reply["error"]), (bad, reply)
    s = connect(agent)
    s.send(json.dumps({"v": 1, "op": "wake", "level": MiB}).encode())  # our own cgroup: not watched
    reply = json.loads(s.recv(4096))
    s.close()
    assert reply["ok"] is False and "not watched" in str(reply["error"]), reply
    s, reply = open_wake(agent, cg, MiB)
    try:
        s.send(json.dumps({"v": 1, "op": "watch", "rules": []}).encode())  # a wake connection only moves its level
        reply = json.loads(s.recv(4096))
        assert reply["ok"] is False and "only moves its level" in str(reply["error"]), reply
    finally:
        s.close()


def _try(agent: AgentProcess, message: dict[str, object], established: bool) -> None:
    cg: Cgroup = agent.cg  # type: ignore[attr-defined]
    raw = json.dumps(message, allow_nan=True).encode("utf-8", "surrogatepass")
    try:
        s = open_wake(agent, cg, MiB)[0] if established else connect(agent)
    except (OSError, ValueError):
        return
    try:
        s.send(raw[:5000])
        s.settimeout(0.2 if established else 3)
        try:
            data = s.recv(4096)
        except (TimeoutError, OSError):
            return  # a level moved: no reply
        if data:
            got = json.loads(data)
            assert isinstance(got, dict), got
    except (ConnectionResetError, BrokenPipeError):
        pass
    finally:
        s.close()


def test_fuzz_the_wake_op(agent: AgentProcess) -> None:
    fds0, rss0 = agent.fds(), agent.rss_kib()

    @settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
    @given(message=wake_messages, established=st.booleans())
    def one(message: dict[str, object], established: bool) -> None:
        _try(agent, message, established)

    one()
    assert agent.proc.poll() is None, agent.text()[-3000:]
    assert agent.fds() < fds0 + 32, (fds0, agent.fds())
    assert agent.rss_kib() < rss0 + 64 * 1024, (rss0, agent.rss_kib())
    assert "Traceback" not in agent.text()
    honest_wake(agent)
