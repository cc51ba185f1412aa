"""The node agent, for real: ``rtml-ebpf agent`` as root, clients as uid 65534 with no
capabilities in limited cgroups, reading their verdict pages with no syscall."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import uuid

import pytest
from support.agent import AgentProcess, client_argv, client_env, glob_for, run_client, start_client
from support.cgroups import WORKLOADS, MiB, make_cgroup, needs_bpf, needs_cgroups, wait_until
from support.strace import marker_lines, syscalls_between

from rtml_ebpf.agent.leases import WARM_PAGES

pytestmark = [pytest.mark.root, needs_bpf, needs_cgroups]


@pytest.fixture
def cg():
    with make_cgroup(limit=128 * MiB) as c:
        yield c


@pytest.mark.vm
def test_unprivileged_client_trips_before_the_oom_kill(cg) -> None:
    agent = AgentProcess(glob_for(cg))
    try:
        r = run_client(cg, agent, "flip", 0.8)
    finally:
        agent.stop()
    assert r["backend"] == "agent", r
    assert "node agent" in r["reason"]
    assert r["tripped"] and r["cgroup_id"] == os.stat(cg.directory).st_ino
    # tripped at 80% of the limit, well before the OOM killer (the client is alive to say so)
    assert 0.8 * r["limit"] <= r["usage"] < r["limit"], r
    assert r["held_mib"] < 128
    assert r["growth"], "the stats op should return the kernel's growth counters"
    assert cg.oom_kills() == 0
    assert "watching" in agent.text()


@pytest.mark.vm
def test_a_client_cannot_write_its_page_nor_reach_another_cgroup(cg) -> None:
    agent = AgentProcess(glob_for(cg))
    try:
        r = run_client(cg, agent, "attack")
        assert agent.proc.poll() is None, "the agent must keep serving"
    finally:
        agent.stop()
    eperm_or_eacces = (1, 13)
    assert r["uid"] == 65534
    assert r["own_cgroup_id"] == os.stat(cg.directory).st_ino
    assert r["page_writable_map"] in eperm_or_eacces, r
    assert r["beat_writable_map"] in eperm_or_eacces, r
    assert r["mprotect_writable"] in eperm_or_eacces, r
    assert r["bpf_update"] in eperm_or_eacces, r
    refusals = r["refusals"]
    assert not refusals["other_cgroup"]["ok"] and "credentials" in refusals["other_cgroup"]["error"]
    assert not refusals["other_pid"]["ok"] and "credentials" in refusals["other_pid"]["error"]
    assert not refusals["pod_scope_outside_pod"]["ok"] and "pod" in refusals["pod_scope_outside_pod"]["error"]
    assert not refusals["bad_rule"]["ok"] and "trip_ppm" in refusals["bad_rule"]["error"]
    assert not refusals["stats_first"]["ok"]


def test_two_cgroups_each_get_their_own_page_only(cg) -> None:
    with make_cgroup(limit=64 * MiB) as other:
        agent = AgentProcess(None, extra=("--watch", glob_for(cg), "--watch", glob_for(other)))
        try:
            a = run_client(cg, agent, "flip", 0.5)
            b = run_client(other, agent, "flip", 0.5)
        finally:
            agent.stop()
        assert b["cgroup_id"] == os.stat(other.directory).st_ino and b["limit"] == 64 * MiB
    assert a["cgroup_id"] == os.stat(cg.directory).st_ino and a["limit"] == 128 * MiB


def wait_ready(client: subprocess.Popen[str], timeout: float = 120) -> None:
    """Until the client printed its ready line (its Limiter is on the agent)."""
    assert client.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = client.stdout.readline()
        if not line:
            raise AssertionError(f"the client exited first: {client.stderr.read()[-2000:] if client.stderr else ''}")
        if '"ready"' in line:
            return
    raise AssertionError("the client never got ready")


def test_a_container_may_ask_for_its_pod_and_nothing_above(cg) -> None:
    # A kubelet-shaped tree (cgroupfs driver) made of real cgroups: kubepods/pod<uid>/<container id>.
    uid, cid = "0f5e7a2c-3b1d-4e8f-9a6b-7c2d1e0f3a4b", "ab" * 32
    kubepods = os.path.join(cg.directory, "kubepods")
    pod = os.path.join(kubepods, f"pod{uid}")
    container = os.path.join(pod, cid)
    for d in (kubepods, pod, container):
        os.mkdir(d)
    agent = AgentProcess(glob_for(cg))
    procs = []
    try:
        def run(target: str) -> dict:
            p = subprocess.Popen(client_argv("scope", target), env=client_env(agent), stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True,
                                 preexec_fn=lambda: _join(container))  # noqa: PLW1509 - root, before exec
            procs.append(p)
            out, err = p.communicate(timeout=120)
            assert p.returncode == 0, err[-2000:]
            return json.loads(out.strip().splitlines()[-1])

        got = run(pod)
        assert got.get("backend") == "agent" and got["cgroup_dir"] == pod, got
        assert got["limit"] == 128 * MiB  # the test cgroup's limit, above the pod
        above = run(kubepods)
        assert "not" in above["error"] and "agent" in above["error"], above
    finally:
        agent.stop()
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for d in (container, pod, kubepods):
            _rmdir(d)


def test_metrics_match_the_kernel_carry_kubelet_labels_and_drop_removed_cgroups(cg) -> None:
    import re

    uid, cid = "0f5e7a2c-3b1d-4e8f-9a6b-7c2d1e0f3a4b", "cd" * 32
    kubepods = os.path.join(cg.directory, "kubepods")
    burstable = os.path.join(kubepods, "burstable")
    pod = os.path.join(burstable, f"pod{uid}")
    container = os.path.join(pod, cid)
    for d in (kubepods, burstable, pod, container):
        os.mkdir(d)
    with open(os.path.join(container, "memory.limit_in_bytes" if os.path.exists(
            os.path.join(container, "memory.limit_in_bytes")) else "memory.max"), "w") as f:
        f.write(str(96 * MiB))
    holder = None
    # the pod and its container only: with the test's cgroup, kubepods and the QoS level that
    # would be five watched cgroups on one path, one more than the programs follow
    agent = AgentProcess(glob_for(cg).rstrip("*") + "/kubepods/burstable/pod*")
    try:
        holder = subprocess.Popen([sys.executable, WORKLOADS, "hold"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  text=True, bufsize=1, preexec_fn=lambda: _join(container))  # noqa: PLW1509
        assert holder.stdin is not None and holder.stdout is not None
        holder.stdout.readline()
        holder.stdin.write("40\n")
        holder.stdin.flush()
        holder.stdout.readline()
        time.sleep(1.0)
        text = agent.scrape()
        usage_file = os.path.join(container, "memory.usage_in_bytes" if os.path.exists(
            os.path.join(container, "memory.usage_in_bytes")) else "memory.current")
        with open(usage_file) as f:
            kernel = int(f.read())
        line = next(ln for ln in text.splitlines() if ln.startswith("rtml_cgroup_usage_bytes{") and cid in ln)
        assert f'pod_uid="{uid}"' in line and f'container_id="{cid}"' in line and 'qos="burstable"' in line, line
        got = int(line.rsplit(" ", 1)[1])
        assert abs(got - kernel) <= 64 * 4096 * os.cpu_count(), (got, kernel)  # the counter's per-CPU batch
        assert got >= 40 * MiB
        limit = next(ln for ln in text.splitlines() if ln.startswith("rtml_cgroup_limit_bytes{") and cid in ln)
        assert int(limit.rsplit(" ", 1)[1]) == 96 * MiB
        # the holder maps shared memory (file pages): the charges by kind add up to what it holds
        charged = [int(ln.rsplit(" ", 1)[1]) for ln in text.splitlines()
                   if ln.startswith("rtml_cgroup_charged_bytes_total{") and cid in ln]
        assert len(charged) == 4 and sum(charged) >= 40 * MiB, charged
        assert re.search(r"^rtml_agent_watched_cgroups \d+$", text, re.M)
        assert "# TYPE rtml_cgroup_charged_bytes_total counter" in text
    finally:
        if holder is not None:
            holder.kill()
            holder.wait()
        for d in (container, pod, burstable, kubepods):
            _rmdir(d)
    try:
        assert wait_until(lambda: cid not in agent.scrape(), timeout=3), "a removed cgroup's series stayed"
    finally:
        agent.stop()


def _join(directory: str) -> None:
    with open(os.path.join(directory, "cgroup.procs"), "w") as f:
        f.write(str(os.getpid()))


def _rmdir(directory: str) -> None:
    for _ in range(50):
        try:
            os.rmdir(directory)
            return
        except OSError:
            time.sleep(0.1)


def _raw(path: str, payload: bytes) -> dict:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.settimeout(5)
    s.connect(path)
    if payload:
        s.send(payload)
    data = s.recv(8192)
    s.close()
    return json.loads(data) if data else {"ok": None}


def test_bad_oversized_and_slow_requests_get_an_error_and_the_agent_keeps_serving(cg) -> None:
    agent = AgentProcess(glob_for(cg))
    try:
        assert "not JSON" in _raw(agent.socket, b"\xff\xfe not json")["error"]
        assert "over 4096" in _raw(agent.socket, b"{" + b" " * 6000 + b"}")["error"]
        assert "version" in _raw(agent.socket, b'{"v": 99, "op": "watch"}')["error"]
        assert "op=" in _raw(agent.socket, b'{"v": 1, "op": "explode"}')["error"]
        assert "rules" in _raw(agent.socket, b'{"v": 1, "op": "watch", "rules": []}')["error"]
        assert "JSON object" in _raw(agent.socket, b"[1, 2]")["error"]
        t0 = time.monotonic()
        slow = _raw(agent.socket, b"")  # connects and says nothing
        assert "no request within" in slow["error"] and time.monotonic() - t0 < 3
        assert agent.proc.poll() is None
        r = run_client(cg, agent, "flip", 0.5)
        assert r["backend"] == "agent" and r["tripped"]
    finally:
        agent.stop()


def test_hot_path_makes_no_syscall_as_uid_65534(cg, tmp_path) -> None:
    agent = AgentProcess(glob_for(cg))
    trace = tmp_path / "trace"
    try:
        p = cg.popen(["strace", "-f", "-qq", "-e", "trace=all", "-o", str(trace),
                      *__import__("support.agent", fromlist=["client_argv"]).client_argv("hotloop", 200000)],
                     env=client_env(agent))
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err[-2000:]
        assert json.loads(out.strip().splitlines()[-1])["backend"] == "agent"
    finally:
        agent.stop()
    lines = trace.read_text().splitlines()
    marks = marker_lines(lines)
    assert len(marks) >= 2, "markers not found in the trace"
    main_pid = lines[marks[-2]].split()[0]
    between = syscalls_between(lines, marks[-2], marks[-1], main_pid)
    assert between == [], f"200000 checks made syscalls: {between[:5]}"


@pytest.mark.vm
def test_kill9_then_restart_with_pins_no_wrong_answer_no_gap(cg) -> None:
    pin_dir = f"/sys/fs/bpf/rtml-test-{uuid.uuid4().hex[:8]}"
    agent = AgentProcess(glob_for(cg), pin_dir=pin_dir)
    second = None
    try:
        # holds 96 MiB of 128 (threshold 0.5): the true answer is "reached" throughout
        client = start_client(cg, agent, "hold", 96, 6)
        wait_ready(client)
        time.sleep(1.0)
        agent.kill9()
        time.sleep(1.0)
        second = AgentProcess(glob_for(cg), pin_dir=pin_dir, socket_dir=agent.dir)
        out, err = client.communicate(timeout=60)
        assert client.returncode == 0, err[-2000:]
        r = json.loads(out.strip().splitlines()[-1])
        assert "adopted" in second.text(), second.text()
        assert r["answers"].get("agent:True", 0) > 1000, r
        assert set(r["answers"]) == {"agent:True"}, f"a wrong answer or a fall back during the restart: {r}"
        # the restarted agent took the lease back: its log shows no new watch of the cgroup needed
        assert second.proc.poll() is None
    finally:
        if second is not None:
            second.stop()
        if agent.proc.poll() is None:
            agent.stop()
        subprocess.run([os.sys.executable, "-m", "rtml_ebpf.cli", "agent", "--unload", "--pin-dir", pin_dir],
                       capture_output=True)
    assert not os.path.exists(pin_dir)


@pytest.mark.vm
def test_agent_gone_unpinned_clients_fall_back_to_polling_within_a_second_and_come_back(cg) -> None:
    agent = AgentProcess(glob_for(cg))
    second = None
    try:
        client = start_client(cg, agent, "hold", 0, 60, "until_back")
        wait_ready(client)
        time.sleep(1.0)
        killed = time.time()
        agent.kill9()  # --no-pin: its programs go with it
        time.sleep(1.5)
        second = AgentProcess(glob_for(cg), socket_dir=agent.dir)
        restarted = time.time()
        out, err = client.communicate(timeout=120)
        assert client.returncode == 0, err[-2000:]
    finally:
        if second is not None:
            second.stop()
    r = json.loads(out.strip().splitlines()[-1])
    switches = r["switches"]
    assert switches[0][1] == "agent:False", r
    to_poll = [t for t, key in switches if key.startswith("poll:")]
    assert to_poll, f"never fell back: {r}"
    assert to_poll[0] - killed < 1.2, f"fell back {to_poll[0] - killed:.2f} s after the kill: {r}"
    back = [t for t, key in switches if key.startswith("agent:") and t > to_poll[0]]
    # AGENT_RETRY_INTERVAL is 5 s
    assert back and back[0] - restarted < 6.5, f"did not return to the restarted agent: {r}"
    assert "node agent back" in r["reason"], r


def test_a_client_building_and_closing_limiters_leaks_no_mapping_fd_or_memory(cg) -> None:
    agent = AgentProcess(glob_for(cg))
    try:
        r = run_client(cg, agent, "limiters", 2000, timeout=300)
    finally:
        agent.stop()
    (maps0, fds0, rss0), (maps1, fds1, rss1) = r["before"], r["after"]
    assert r["answers"] == [False]  # closed (fail open): the retired page answers the fail answer
    assert maps1 <= maps0 + 2 and fds1 <= fds0 + 1, r
    assert rss1 - rss0 < 4 * 1024, r  # KiB


def test_fifty_clients_churning_connections_leave_fds_and_rss_flat() -> None:
    with make_cgroup(limit=2048 * MiB) as cg:  # 50 Pythons
        _churn(cg)


def _churn(cg) -> None:
    agent = AgentProcess(glob_for(cg))
    try:
        run_client(cg, agent, "flip", 0.3)  # warm: the cgroup's page exists
        fds0, rss0 = agent.fds(), agent.rss_kib()
        clients = [start_client(cg, agent, "churn", 10, 20) for _ in range(50)]
        results = []
        for c in clients:
            out, err = c.communicate(timeout=120)
            assert c.returncode == 0, err[-2000:]
            results.append(json.loads(out.strip().splitlines()[-1]))
        # + WARM_PAGES: the agent makes the pages of the next free slots ahead, between requests
        # (leases.page_to_warm); some may be made after fds0 was read. A leak per lease would be
        # thousands of fds.
        assert wait_until(lambda: agent.fds() <= fds0 + 2 + WARM_PAGES, timeout=5), (fds0, agent.fds())
        fds1, rss1 = agent.fds(), agent.rss_kib()
        total = sum(r["ok"] for r in results)
        errors = sum(r["errors"] for r in results)
    finally:
        agent.stop()
    # Enough churn to see a leak; how fast the agent registers is P9's figure (make bench), not
    # an assertion here (it was 5000 in 10 s, and failed on a loaded 2-core machine).
    assert total >= 1000, f"only {total} leases served in 10 s ({errors} errors: {results[0]['first_error']})"
    assert errors <= total * 0.01, (total, errors)
    assert rss1 - rss0 < 8 * 1024, f"agent RSS grew {rss1 - rss0} KiB"
    print(f"\n  {total} leases in 10 s by 50 clients; fds {fds0} -> {fds1}; RSS {rss0} -> {rss1} KiB")


def test_cgroups_made_and_removed_are_watched_and_dropped_within_a_second(cg) -> None:
    agent = AgentProcess(glob_for(cg))
    try:
        with make_cgroup(limit=32 * MiB, parent=cg) as child:
            name = os.path.basename(child.directory)
            assert wait_until(lambda: f"watching {child.directory}" in agent.text(), timeout=1.5), agent.text()
        assert wait_until(lambda: f"unwatched {child.directory}" in agent.text(), timeout=1.5), agent.text()
        assert name
    finally:
        agent.stop()
