"""The kernel's per-thread meter lent by the node agent to unprivileged clients: real agent on a
private socket, real cgroups, clients as uid 65534 with no capabilities (tests/support/meter_client.py)."""

from __future__ import annotations

import ctypes
import json
import os
import subprocess

import pytest
from support.agent import NOBODY, AgentProcess, client_env, glob_for, nobody_python
from support.cgroups import MiB, make_cgroup, needs_bpf, needs_cgroups, wait_until

pytestmark = [pytest.mark.root, needs_bpf, needs_cgroups]

METER_CLIENT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "support", "meter_client.py")


def meter_argv(mode: str, *args: object) -> list[str]:
    return [*NOBODY, nobody_python(), METER_CLIENT, mode, *map(str, args)]


def run_meter(cg, agent: AgentProcess, mode: str, *args: object) -> dict:
    p = cg.popen(meter_argv(mode, *args), env=client_env(agent))
    out, err = p.communicate(timeout=60)
    if p.returncode != 0:
        raise AssertionError(f"client exited {p.returncode}; stderr:\n{err[-3000:]}\n"
                             f"agent log:\n{agent.text()[-3000:]}")
    return json.loads(out.strip().splitlines()[-1])


def registered_threads(pin_dir: str) -> int:
    """tmeter_n[0], read from the agent's pinned map (root: the test may)."""
    from rtml_ebpf.ebpf import libbpf as _libbpf

    lib = _libbpf.lib()
    fd = lib.bpf_obj_get(os.path.join(pin_dir, "maps", "tmeter_n").encode())
    assert fd >= 0, "the agent pins tmeter_n"
    try:
        key, value = ctypes.c_uint32(0), ctypes.c_uint32()
        assert lib.bpf_map_lookup_elem(fd, ctypes.byref(key), ctypes.byref(value)) == 0
        return int(value.value)
    finally:
        os.close(fd)


@pytest.fixture
def cg():
    with make_cgroup(limit=256 * MiB) as c:
        yield c


@pytest.fixture
def pin_dir(tmp_path_factory):
    import uuid

    d = f"/sys/fs/bpf/rtml-test-meter-{uuid.uuid4().hex[:8]}"
    yield d
    from rtml_ebpf.agent.programs import remove_pins

    remove_pins(d)


def within(value: int, want: int, frac: float = 0.10) -> bool:
    return abs(value - want) <= frac * want


@pytest.mark.vm
def test_unprivileged_client_meters_its_threads_with_the_kernel_meter(cg) -> None:
    agent = AgentProcess(glob_for(cg))
    try:
        r = run_meter(cg, agent, "measure", 64)
    finally:
        agent.stop()
    assert r["uid"] == 65534 and r["backend"] == "agent", r
    assert r["source"] == "agent", r
    assert r["shared"] is True, r
    # a forked child asks on a connection of its own (its parent's would name the parent)
    assert r["child"]["live"] is True and r["child"]["own"] is True, r
    assert r["child"]["stats"]["connection"] == "own" and r["child"]["stats"]["registered"] == 1, r
    # before 6.13 (no memcg tracepoints) the programs count faults: growth, not frees
    frees_seen = "memcg_lruvec" in r["hooks"]
    for name, mib in (("main", 64), ("thread", 32), ("after_fork", 64)):
        m = r[name]
        # the kernel's charges, within 10%: growth, the peak, and the free (getrusage sees no free)
        assert within(m["grew"], mib * MiB), (name, m)
        assert within(m["peak"], mib * MiB), (name, m)
        if frees_seen:
            assert abs(m["freed_net"]) <= 0.10 * mib * MiB, (name, m)
        else:
            assert within(m["freed_net"], mib * MiB), (name, m)  # the free unseen, as documented
        assert within(m["kept_peak"], mib * MiB), (name, m)
        # after reset_peak, the peak counts from the net at the reset: the 1 MiB allocated since
        assert 0.5 * MiB <= m["after_reset_peak"] <= 2 * MiB, (name, m)
        assert m["net_of"], (name, m)
    assert r["meter_stats"]["threads"] >= 1 and r["meter_stats"]["refused"] == 0, r


@pytest.mark.vm
def test_a_client_meters_only_its_own_threads_and_cannot_write_the_page(cg) -> None:
    other = subprocess.Popen(["sleep", "60"])  # another process: its tid is not the client's
    agent = AgentProcess(glob_for(cg))
    try:
        r = run_meter(cg, agent, "attack", other.pid)
        assert agent.proc.poll() is None, "the agent must keep serving"
    finally:
        agent.stop()
        other.kill()
        other.wait()
    eperm_or_eacces = (1, 13)
    assert r["uid"] == 65534
    refusals = r["refusals"]
    assert not refusals["other_process"]["ok"] and "not a thread of your process" in refusals["other_process"]["error"]
    assert not refusals["no_such_thread"]["ok"] and "not a thread" in refusals["no_such_thread"]["error"]
    assert not refusals["with_pid"]["ok"] and "credentials" in refusals["with_pid"]["error"]
    assert not refusals["bad_tid"]["ok"] and "tid=-1" in refusals["bad_tid"]["error"]
    assert not refusals["bool_tid"]["ok"] and "tid=True" in refusals["bool_tid"]["error"]
    assert not refusals["before_watch"]["ok"]
    assert r["own"]["ok"] and r["own"]["pages"] and r["fds"] == 2, r
    assert r["page_writable_map"] in eperm_or_eacces, r
    assert r["mprotect_writable"] in eperm_or_eacces, r
    assert r["bpf_update"] in eperm_or_eacces, r
    # the page holds this cgroup's threads only: here, the client's own
    assert r["page_tids"] == [r["own_tid"]], r
    assert r["again"] == {"ok": True, "pages": False, "fds": 0}, r


def test_registered_threads_return_to_zero_when_clients_leave(cg, pin_dir) -> None:
    agent = AgentProcess(glob_for(cg), pin_dir=pin_dir)
    try:
        assert registered_threads(pin_dir) == 0
        p = cg.popen(meter_argv("hold", 30), env=client_env(agent))
        assert p.stdout is not None
        line = p.stdout.readline()
        assert json.loads(line) == {"registered": True, "source": "agent"}, (line, agent.text()[-2000:])
        assert registered_threads(pin_dir) == 2  # the main thread and one more
        p.kill()
        p.wait()
        assert wait_until(lambda: registered_threads(pin_dir) == 0, timeout=5)
    finally:
        agent.stop()


def test_over_the_cap_is_a_soft_refusal_that_keeps_the_lease(cg) -> None:
    agent = AgentProcess(glob_for(cg))
    try:
        r = run_meter(cg, agent, "cap", 66)
    finally:
        agent.stop()
    # 64 threads per connection; the others are told why, and the connection still serves
    assert r["granted"] == 64, r
    assert len(r["refusals"]) == 2 and all(x["full"] and "64 thread meters" in x["error"] for x in r["refusals"]), r
    assert r["stats_ok"] is True, r


@pytest.mark.parametrize("forked", [False, True], ids=["lease", "forked_worker"])
def test_the_meter_follows_the_lease_across_an_agent_restart(cg, pin_dir, forked: bool) -> None:
    """forked: the measuring process is a forked worker, on its own connection: the agent's
    restart closes it, and the worker opens another and registers again."""
    agent = AgentProcess(glob_for(cg), pin_dir=pin_dir)
    p = cg.popen(meter_argv("restart", 32, *(["forked"] if forked else [])), env=client_env(agent),
                 stdin=subprocess.PIPE)
    try:
        assert p.stdout is not None and p.stdin is not None
        line = p.stdout.readline()
        assert line, p.stderr.read() if p.stderr else ""
        first = json.loads(line)
        assert within(first["first"], 32 * MiB) and first["stats"]["registered"] == 1, first
        assert registered_threads(pin_dir) == 1
        agent.kill9()  # no goodbye: its entries stay in the pinned maps, the programs keep running
        agent.log.close()
        agent = AgentProcess(glob_for(cg), pin_dir=pin_dir, socket_dir=agent.dir)
        assert "adopting the pinned programs" in agent.text()
        assert registered_threads(pin_dir) == 0  # the adopting agent starts its clients' meters afresh
        p.stdin.write("go\n")
        p.stdin.flush()
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err[-3000:]
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        agent.stop()
    lines = out.strip().splitlines()
    if forked:
        assert json.loads(lines[-1]) == {"worker_status": 0}, out
    r = json.loads(lines[-2] if forked else lines[-1])
    assert r["backend"] == "agent", r
    assert r["stats"]["registered"] >= 2 and r["stats"]["off"] is None, r  # asked again on the new connection
    assert r["stats"]["connection"] == ("own" if forked else "lease"), r
    assert within(r["again"], 32 * MiB), r


@pytest.mark.vm
def test_forked_workers_meter_their_threads_on_connections_of_their_own(cg, pin_dir) -> None:
    """A pre-fork master (the process that built the Limiter) and 2 forked workers, one of which
    forks again: each measures its thread's 32 MiB with the kernel meter, asking on a connection
    of its own (the agent would refuse a worker's tids on the master's lease, and close it)."""
    agent = AgentProcess(glob_for(cg), pin_dir=pin_dir)
    p = cg.popen(meter_argv("fork", 32), env=client_env(agent), stdin=subprocess.PIPE)
    try:
        assert p.stdout is not None and p.stdin is not None
        line = p.stdout.readline()
        assert json.loads(line or "{}") == {"workers_ready": True}, (p.stderr.read() if p.stderr else "", agent.text())
        # master 1 thread, worker 0: 1 + 1 (after its grandchild left), worker 1: 1; the
        # grandchild's entry went with it
        assert registered_threads(pin_dir) == 4, agent.text()[-3000:]
        p.stdin.write("go\n")
        p.stdin.flush()
        line = p.stdout.readline()
        assert json.loads(line or "{}") == {"parent_done": True}, p.stderr.read() if p.stderr else ""
        # the workers left: their entries went with their connections; the master's 2 stay
        assert wait_until(lambda: registered_threads(pin_dir) == 2, timeout=5), registered_threads(pin_dir)
        p.stdin.write("go\n")
        p.stdin.flush()
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err[-3000:]
        assert wait_until(lambda: registered_threads(pin_dir) == 0, timeout=5), registered_threads(pin_dir)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        agent.stop()
    r = json.loads(out.strip().splitlines()[-1])
    assert r["uid"] == 65534 and r["backend"] == "agent", r
    w0, w1 = sorted(r["workers"], key=lambda w: "grandchild" not in w)  # (in the order they reported)
    measured = [r["before"], w0, w1, w0["grandchild"], w0["after_grandchild"], r["after"]]
    pids = {m["pid"] for m in measured}
    assert len(pids) == 4, r  # master, two workers, a grandchild
    for m in measured:
        assert within(m["grew"], 32 * MiB) and within(m["peak"], 32 * MiB), m
        st = m["stats"]
        assert st["source"] == "agent" and st["off"] is None and st["fallback"] is None, m
        assert st["pid"] == m["pid"] and st["refused"] == 0, m
    for m in (w0, w1, w0["grandchild"], w0["after_grandchild"]):
        assert m["stats"]["connection"] == "own", m
    assert r["before"]["stats"]["connection"] == "lease" and r["after"]["stats"]["connection"] == "lease", r
    assert r["after"]["stats"]["registered"] == 2, r  # its first thread, and one more after the workers left
    assert w0["same_meter"] and w0["shared_in_child"], w0
    # the agent kept the master's lease: the same connection, still answering
    assert r["same_lease"] and r["lease_open"] and r["lease_stats"], r
    assert r["exits"] == [0, 0], r
    assert "not a thread of your process" not in agent.text()


def test_a_worker_past_the_cgroups_connection_cap_measures_with_getrusage_and_says_why(cg) -> None:
    """Past the agent's 256 connections per cgroup (some 250 pre-fork workers in one container),
    a worker's own connection is refused: its threads are measured with getrusage, the reason in
    its meter's stats, and nothing is asked on its parent's lease (which keeps serving)."""
    agent = AgentProcess(glob_for(cg))
    try:
        r = run_meter(cg, agent, "crowd", 32)
    finally:
        agent.stop()
    w, parent = r["worker"], r["parent"]
    assert w["stats"]["connection"] is None and w["stats"]["registered"] == 0, w
    assert "256 connections open" in (w["stats"]["fallback"] or ""), w
    assert w["grew"] >= 32 * MiB * 0.9, w  # getrusage: the growth, counted in faults
    assert parent["stats"]["connection"] == "lease" and within(parent["grew"], 32 * MiB), parent
    assert "not a thread of your process" not in agent.text()


def test_gunicorn_preload_workers_are_charged_by_the_agents_kernel_meter(cg, pin_dir) -> None:
    """``gunicorn --preload`` (2 gthread workers) as uid 65534: the Limiter and the middleware are
    built in the master; each worker's admission charges its requests by the kernel meter, asked
    on a connection of the worker's own (tests/support/prefork_meter_app.py)."""
    import time
    import urllib.error
    import urllib.request

    from support.agent import NOBODY, nobody_python

    from rtml_ebpf.demo.flood import free_port, wait_listening

    support = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "support")
    agent = AgentProcess(glob_for(cg), pin_dir=pin_dir)
    port = free_port()
    argv = [*NOBODY, nobody_python(), "-m", "gunicorn", "--preload", "-w", "2", "-k", "gthread", "--threads", "2",
            "-b", f"127.0.0.1:{port}", "--log-level", "warning", "prefork_meter_app:application"]
    env = {**client_env(agent), "HOME": "/tmp", "PYTHONPATH": os.pathsep.join(
        [support, client_env(agent).get("PYTHONPATH", "")])}
    proc = cg.popen(argv, env=env, cwd=support, stdout=subprocess.DEVNULL)
    seen: dict[int, dict] = {}
    try:
        wait_listening(port, proc)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not (
                len(seen) == 2 and all(s["routes"].get("GET /alloc") for s in seen.values())):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/alloc", timeout=10) as resp:
                    assert resp.status == 200
            except urllib.error.HTTPError as exc:  # a learning route's request may be shed: ask again
                assert exc.code == 503, exc
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/stats", timeout=10) as resp:
                s = json.loads(resp.read())
            seen[s["pid"]] = s
        entries = registered_threads(pin_dir)
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        err = proc.stderr.read() if proc.stderr else ""
        agent.stop()
    assert len(seen) == 2, (seen, err[-3000:])
    for pid, s in seen.items():
        assert pid != s["master"], s
        assert s["meter"] == "agent", s
        st = s["meter_stats"]
        assert st["connection"] == "own" and st["pid"] == pid and st["registered"] >= 1, json.dumps(s)
        assert st["fallback"] is None and st["off"] is None and st["refused"] == 0, s
        assert within(s["routes"]["GET /alloc"], 16 * MiB, 0.25), s  # the route's p90, kernel-measured
    assert entries >= 2, entries  # the workers' request threads, in the agent's page
    assert "not a thread of your process" not in agent.text(), agent.text()[-3000:]
