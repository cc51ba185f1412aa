"""OOM kill events, for real: cgroups with real limits, processes the kernel really kills, and
the records ``rtml-ebpf events`` prints (standalone, and through the agent as root and as
uid 65534)."""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from types import SimpleNamespace

import pytest
from support.agent import NOBODY, REPO, AgentProcess, client_env, glob_for, nobody_python
from support.cgroups import Cgroup, MiB, make_cgroup, needs_bpf, needs_cgroups, wait_until

from rtml_ebpf import _cgroup
from rtml_ebpf.ebpf import probes

pytestmark = [pytest.mark.root, needs_bpf, needs_cgroups]
LIMIT = 48 * MiB
ALLOCATE = "b = bytearray(160 << 20)"  # far over LIMIT: the kernel kills it
HOOKED = probes.hook_unavailable(next(h for h in probes.HOOKS if h.name == "oom_victim")) is None


def path_of(cg: Cgroup) -> str:
    return _cgroup.cgroup_from_directory(cg.directory).path


def read_line(stream, timeout: float) -> str:  # type: ignore[no-untyped-def]
    """One line of a child's pipe, or "" after ``timeout``."""
    ready, _, _ = select.select([stream], [], [], timeout)
    return stream.readline() if ready else ""


def wait_subscribed(p: subprocess.Popen[str], timeout: float = 90) -> str:
    """The events command says where its records come from (on stderr) once it listens."""
    assert p.stderr is not None
    line = read_line(p.stderr, timeout)
    assert "OOM kills from" in line or "memory.events" in line, (line, p.poll())
    return line


def kill_in(cg: Cgroup) -> int:
    """A process in ``cg`` that allocates past the limit; the OOM killer takes it. Its pid."""
    p = cg.popen([sys.executable, "-c", ALLOCATE])
    p.wait(timeout=60)
    assert p.returncode == -9, f"expected an OOM kill (SIGKILL), got {p.returncode}"
    return p.pid


def check_record(r: dict, cg: Cgroup, pid: int) -> None:
    assert r["event"] == "oom_kill" and r["cgroup"] == path_of(cg), r
    if HOOKED:
        assert r["source"] == "bpf", r
        assert r["pid"] == pid and r["tid"] == pid and r["comm"].startswith("python"), r
        assert r["cgroup_id"] == os.stat(cg.directory).st_ino
        assert r["limit_cgroup"] == path_of(cg) and r["limit_bytes"] == LIMIT, r
        # chosen at the limit: usage within the page counter's per-CPU batches of it
        assert LIMIT - 64 * 4096 * os.cpu_count() <= r["usage_bytes"] <= LIMIT, r  # type: ignore[operator]
        # the victim held most of the cgroup (its bytearray), as anonymous memory
        assert r["victim_rss_anon_bytes"] >= LIMIT // 2 and r["victim_rss_bytes"] >= r["victim_rss_anon_bytes"], r
        assert abs(r["time"] - time.time()) < 60
    else:
        assert r["source"] == "memory.events" and r["pid"] is None and r["count"] == 1, r
        assert r["limit_bytes"] == LIMIT, r


def events_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "rtml_ebpf.cli", "events", *args]


@pytest.mark.vm
def test_standalone_events_name_the_victim_its_cgroup_usage_limit_and_rss() -> None:
    with make_cgroup(limit=LIMIT) as cg:
        p = subprocess.Popen(events_cmd("--source", "standalone", "--count", "1", "--timeout", "90",
                                        "--cgroup", path_of(cg)), cwd=REPO, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            note = wait_subscribed(p)
            if not HOOKED:
                assert "6.8" in note, note  # says why there is no pid
                time.sleep(1.5)  # the counter's baseline is taken at the first read
            pid = kill_in(cg)
            out, err = p.communicate(timeout=60)
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
        assert p.returncode == 0, err
        records = [json.loads(line) for line in out.splitlines()]
        assert len(records) == 1, out
        check_record(records[0], cg, pid)
        assert cg.oom_kills() == 1


@contextmanager
def pod_under(tree: Cgroup) -> Iterator[SimpleNamespace]:
    """A kubelet-named pod cgroup (cgroupfs driver) under ``tree``, removed after."""
    directory = os.path.join(tree.directory, f"pod{uuid.uuid4()}")
    if os.path.exists(os.path.join(tree.directory, "cgroup.subtree_control")):
        with open(os.path.join(tree.directory, "cgroup.subtree_control"), "w") as f:
            f.write("+memory")
    os.mkdir(directory)
    try:
        yield SimpleNamespace(directory=directory)
    finally:
        os.rmdir(directory)


def test_agent_sends_root_every_kill_and_nobody_only_its_own_pods() -> None:
    with make_cgroup() as tree, pod_under(tree) as pod, \
            make_cgroup(limit=LIMIT, parent=pod) as victim, make_cgroup(parent=pod) as sidecar, \
            make_cgroup(limit=LIMIT) as other:  # type: ignore[arg-type]
        agent = AgentProcess(None, extra=("--watch", glob_for(tree), "--watch", glob_for(other)))
        root = nobody = None
        try:
            root = subprocess.Popen(events_cmd("--source", "agent", "--socket", agent.socket, "--count", "2",
                                               "--timeout", "90"),
                                    cwd=REPO, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            # uid 65534 in the pod's other container asks for its pod: it sees `victim`, not `other`
            nobody = sidecar.popen([*NOBODY, nobody_python(), "-m", "rtml_ebpf.cli", "events", "--source", "agent",
                                    "--scope", "pod", "--timeout", "30"],
                                   env={**client_env(agent), "PYTHONUNBUFFERED": "1"})
            wait_subscribed(root)
            pod_path = _cgroup.cgroup_from_directory(pod.directory).path
            assert f"under {pod_path}" in wait_subscribed(nobody)
            if not HOOKED:
                time.sleep(1.5)  # the counters' baseline
            pid_mine = kill_in(victim)
            pid_other = kill_in(other)
            out_root, err_root = root.communicate(timeout=60)
            assert root.returncode == 0, err_root
            time.sleep(0.5)
            nobody.send_signal(2)  # it has seen all it will: the agent forwards as the kill is read
            out_nobody, _ = nobody.communicate(timeout=30)
        finally:
            for p in (root, nobody):
                if p is not None and p.poll() is None:
                    p.kill()
                    p.wait()
            agent.stop()
        by_cgroup = {r["cgroup"]: r for r in map(json.loads, out_root.splitlines())}
        check_record(by_cgroup[path_of(victim)], victim, pid_mine)
        check_record(by_cgroup[path_of(other)], other, pid_other)
        seen_by_nobody = [json.loads(line) for line in out_nobody.splitlines()]
        assert [r["cgroup"] for r in seen_by_nobody] == [path_of(victim)], out_nobody
        log = agent.text()
        assert "OOM kill {" in log and f'"cgroup":"{path_of(other)}"' in log, log[-2000:]


def test_agent_counts_kills_in_metrics() -> None:
    with make_cgroup(limit=LIMIT) as cg:
        agent = AgentProcess(glob_for(cg))
        try:
            kill_in(cg)
            source = "bpf" if HOOKED else "memory.events"
            assert wait_until(lambda: f'rtml_agent_oom_events_total{{source="{source}"}} 1' in agent.scrape(),
                              timeout=10), agent.scrape()[-1500:]
            text = agent.scrape()
        finally:
            agent.stop()
        assert "rtml_agent_oom_events_lost_total 0" in text


def test_program_run_time_is_exported_also_by_an_agent_that_adopted_the_pins() -> None:
    import uuid

    pin_dir = f"/sys/fs/bpf/rtml-test-{uuid.uuid4().hex[:8]}"
    with open("/proc/sys/kernel/bpf_stats_enabled") as f:
        was = f.read().strip()
    with make_cgroup(limit=LIMIT) as cg:
        try:
            with open("/proc/sys/kernel/bpf_stats_enabled", "w") as f:
                f.write("1")
            texts = []
            for _ in range(2):  # the second agent adopts the first one's pinned programs
                agent = AgentProcess(glob_for(cg), pin_dir=pin_dir)
                try:
                    h = cg.hold()
                    h.change(8)  # charges and faults: the programs run
                    texts.append(agent.scrape())
                    h.proc.kill()
                    h.proc.wait()
                finally:
                    agent.stop()
            assert "adopted" in agent.text()
        finally:
            with open("/proc/sys/kernel/bpf_stats_enabled", "w") as f:
                f.write(was)
            subprocess.run([sys.executable, "-m", "rtml_ebpf.cli", "agent", "--unload", "--pin-dir", pin_dir],
                           cwd=REPO, check=True, capture_output=True)
    for text in texts:
        assert "rtml_agent_bpf_stats_enabled 1" in text
        runs = {line.split('"')[1]: int(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                if line.startswith("rtml_agent_program_runs_total{")}
        seconds = {line.split('"')[1]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith("rtml_agent_program_run_seconds_total{")}
        busy = "memcg_lruvec" if "memcg_lruvec" in runs else "page_fault_user"
        assert runs.get(busy, 0) > 0 and seconds.get(busy, 0) > 0, text[-3000:]


def test_without_the_hook_the_agent_counts_from_memory_events_and_says_so() -> None:
    with make_cgroup(limit=LIMIT) as cg:
        agent = AgentProcess(glob_for(cg), extra=("--hooks", "page_fault_user"))  # no oom_victim
        cg_path = path_of(cg)
        reader = None
        try:
            reader = subprocess.Popen(events_cmd("--source", "agent", "--socket", agent.socket, "--count", "1",
                                                 "--timeout", "60"),
                                      cwd=REPO, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            note = wait_subscribed(reader)
            time.sleep(1.5)  # the counter's baseline
            kill_in(cg)
            out, err = reader.communicate(timeout=60)
        finally:
            if reader is not None and reader.poll() is None:
                reader.kill()
                reader.wait()
            agent.stop()
    assert "source memory.events" in note and "6.8" in note, note
    assert "memory.events" in agent.text() and "6.8" in agent.text()
    (record,) = [json.loads(line) for line in out.splitlines()]
    assert record["source"] == "memory.events" and record["count"] == 1 and record["pid"] is None, record
    assert record["cgroup"] == cg_path and record["limit_bytes"] == LIMIT
    assert record["limit_cgroup"] == cg_path, record
