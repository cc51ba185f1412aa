"""Structure-aware fuzzing of a running agent (issue 21): the socket protocol (nesting, huge
numbers, unicode, truncation, wrong types, fds passed in) and the HTTP endpoint (malformed
request lines, huge headers, truncation). After each suite the agent is alive, its fds and
RSS are bounded, and it still serves an honest client."""

from __future__ import annotations

import json
import os
import socket

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support.agent import AgentProcess, glob_for, run_client
from support.cgroups import MiB, make_cgroup, needs_bpf, needs_cgroups

pytestmark = [needs_bpf, needs_cgroups, pytest.mark.root]

FIELDS = ["v", "op", "scope", "rules", "metric", "trip_ppm", "clear_ppm", "trip_bytes", "clear_bytes", "cgroup", "tid"]
scalars = (st.none() | st.booleans() | st.integers(min_value=-(1 << 70), max_value=1 << 70)
           | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=20) | st.sampled_from(
               ["watch", "stats", "events", "meter", "self", "pod", "usage", "working_set", "\ud800"]))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                      | st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=8), inner, max_size=5),
                      max_leaves=20)
messages = st.dictionaries(st.sampled_from(FIELDS), values, max_size=6)


def _raw(message: object) -> bytes:
    return json.dumps(message, allow_nan=True).encode("utf-8", "surrogatepass")


wire = (messages.map(_raw)
        | st.tuples(messages.map(_raw), st.integers(0, 200)).map(lambda t: t[0][: t[1]])  # truncated
        | st.integers(1, 3000).map(lambda n: b"[" * n)
        | st.integers(1, 1500).map(lambda n: b'{"v":' * n)
        | st.binary(max_size=300)
        | st.integers(1, 4000).map(lambda n: b'{"v":' + b"9" * n + b"}"))


@pytest.fixture(scope="module")
def agent():
    with make_cgroup(limit=128 * MiB) as cg:
        a = AgentProcess(glob_for(cg))
        a.cg = cg  # type: ignore[attr-defined]
        try:
            yield a
        finally:
            a.stop()


def _send(path: str, data: bytes, pass_fds: bool) -> None:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.settimeout(3)
    try:
        s.connect(path)
        if pass_fds:
            r, w = os.pipe()
            s.sendmsg([data or b"{}"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, bytes(memoryview(
                __import__("array").array("i", [r, w]))))])
            os.close(r)
            os.close(w)
        elif data:
            s.send(data)
        else:
            return
        try:
            reply, anc, _, _ = s.recvmsg(8192, socket.CMSG_SPACE(8))
        except (TimeoutError, OSError):
            return
        for _, _, raw in anc:
            for i in range(0, len(raw) - 3, 4):
                os.close(int.from_bytes(raw[i:i + 4], "little"))
        if reply:
            got = json.loads(reply)
            assert isinstance(got, dict) and "ok" in got
    except (ConnectionResetError, BrokenPipeError):
        pass
    finally:
        s.close()


def _bounded(agent: AgentProcess, fds0: int, rss0: int) -> None:
    assert agent.proc.poll() is None, agent.text()[-3000:]
    assert agent.fds() < fds0 + 32, (fds0, agent.fds())
    assert agent.rss_kib() < rss0 + 64 * 1024, (rss0, agent.rss_kib())
    assert "Traceback" not in agent.text()


def test_fuzz_the_socket_protocol(agent: AgentProcess) -> None:
    fds0, rss0 = agent.fds(), agent.rss_kib()

    @settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
    @given(data=wire, pass_fds=st.booleans())
    def one(data: bytes, pass_fds: bool) -> None:
        _send(agent.socket, data[:5000], pass_fds)

    one()
    _bounded(agent, fds0, rss0)
    r = run_client(agent.cg, agent, "flip", 0.5)  # type: ignore[attr-defined]
    assert r["backend"] == "agent" and r["tripped"], r


def test_fuzz_the_meter_op(agent: AgentProcess) -> None:
    """The meter op needs a watching connection from inside a watched cgroup: a client as uid
    65534 in the agent's cgroup relays the fuzzed requests (tests/support/meter_client.py relay)."""
    import subprocess

    from support.agent import NOBODY, client_env, nobody_python

    client = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "support", "meter_client.py")
    fds0, rss0 = agent.fds(), agent.rss_kib()
    cg = agent.cg  # type: ignore[attr-defined]
    p = cg.popen([*NOBODY, nobody_python(), client, "relay"], env=client_env(agent), stdin=subprocess.PIPE)
    assert p.stdin is not None and p.stdout is not None
    own = json.loads(p.stdout.readline())["tid"]
    tids = (st.none() | st.booleans() | st.integers(-(1 << 70), 1 << 70) | st.integers(0, 1 << 23)
            | st.sampled_from([own, own, own, p.pid, os.getpid(), 1, 0, 4194304, 4194305])
            | st.floats(allow_nan=True) | st.text(max_size=12) | st.lists(st.integers(), max_size=3))
    extra = st.dictionaries(st.sampled_from(["pid", "cgroup", "scope", "rules", "x", "entry", "gen"]),
                            st.integers() | st.text(max_size=8), max_size=2)
    honest = st.just({"v": 1, "op": "meter", "tid": own})  # the granted side of the op, and asked again
    requests = honest | st.builds(lambda t, e, v, op: {"v": v, "op": op, "tid": t, **e}, tids, st.just({}) | extra,
                                  st.sampled_from([1, 1, 1, 2, "1"]),
                                  st.sampled_from(["meter", "meter", "meter", "Meter"]))
    seen = {"granted": 0, "refused": 0, "closed": 0}

    @settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
    @given(raw=requests.map(_raw) | st.tuples(requests.map(_raw), st.integers(0, 60)).map(lambda t: t[0][: t[1]]))
    def one(raw: bytes) -> None:
        assert p.stdin is not None and p.stdout is not None
        p.stdin.write(raw[:4000].hex() + "\n")
        p.stdin.flush()
        got = json.loads(p.stdout.readline())
        if "closed" in got:
            seen["closed"] += 1
            return
        reply = got["reply"]
        assert isinstance(reply, dict) and isinstance(reply.get("ok"), bool), reply
        seen["granted" if reply["ok"] else "refused"] += 1
        if reply["ok"]:
            assert 0 <= reply["entry"] < 128, reply

    try:
        one()
    finally:
        p.stdin.close()
        p.wait(timeout=30)
    assert p.returncode == 0, p.stderr.read()[-3000:] if p.stderr else ""
    assert seen["granted"] > 0 and seen["refused"] > 0, seen  # both sides of the op were reached
    _bounded(agent, fds0, rss0)
    r = run_client(agent.cg, agent, "flip", 0.5)  # type: ignore[attr-defined]
    assert r["backend"] == "agent" and r["tripped"], r


heads = st.one_of(
    st.builds(lambda m, p, v: f"{m} {p} {v}\r\n\r\n".encode("utf-8", "surrogatepass"),
              st.sampled_from(["GET", "POST", "HEAD", "", "G\x00T", "get"]),
              st.sampled_from(["/healthz", "/readyz", "/metrics", "*", "", "/" + "a" * 9000, "/\udc80"]),
              st.sampled_from(["HTTP/1.1", "HTTP/1.0", "HTTP/9", "", "HTTP/1.1 extra"])),
    st.binary(max_size=2000),
    st.integers(1, 40).map(lambda n: b"GET /healthz HTTP/1.1\r\n" + b"X-A: " + b"b" * (n * 1000) + b"\r\n\r\n"),
    st.integers(0, 60).map(lambda n: b"GET /metrics HTTP/1.1\r\nAuthorization: Bearer x\r\n\r\n"[:n]),
)


def test_fuzz_the_http_endpoint(agent: AgentProcess) -> None:
    port = int(agent.health_url().rsplit(":", 1)[1].split("/")[0])
    fds0, rss0 = agent.fds(), agent.rss_kib()

    @settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
    @given(head=heads)
    def one(head: bytes) -> None:
        s = socket.create_connection(("127.0.0.1", port), timeout=3)
        try:
            s.sendall(head)
            s.shutdown(socket.SHUT_WR)  # truncated: nothing more comes
            data = s.recv(200)
            assert data == b"" or data.startswith(b"HTTP/1.0 ")
        except OSError:
            pass  # reset, or closed before the shutdown: the agent cut a request it refused
        finally:
            s.close()

    one()
    _bounded(agent, fds0, rss0)
    assert agent.probe("/healthz") == (200, "ok\n")
    assert "rtml_agent_clients" in agent.scrape()
