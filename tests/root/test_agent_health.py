"""The agent's health probes and systemd notifications (issue 23), for real: /readyz follows
the programs (detached under the agent, attached again), /healthz fails when the loop is stuck,
and the loop pings systemd's watchdog."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
import uuid

import pytest
from support.agent import AgentProcess, glob_for
from support.cgroups import MiB, make_cgroup, needs_bpf, needs_cgroups, wait_until

pytestmark = [needs_bpf, needs_cgroups, pytest.mark.root]


def test_readyz_goes_unready_when_the_programs_are_detached_and_ready_again_after() -> None:
    pin_dir = f"/sys/fs/bpf/rtml-test-{uuid.uuid4().hex[:8]}"
    with make_cgroup(limit=64 * MiB) as cg:
        first = AgentProcess(glob_for(cg), pin_dir=pin_dir)
        try:
            first.kill9()
            agent = AgentProcess(glob_for(cg), pin_dir=pin_dir, socket_dir=first.dir)  # adopts: holds no link
            try:
                assert "adopting the pinned programs" in agent.text()
                assert wait_until(lambda: agent.probe("/readyz") == (200, "ready\n"), timeout=5)
                for name in os.listdir(f"{pin_dir}/links"):
                    os.unlink(f"{pin_dir}/links/{name}")  # the programs detach under the agent
                seen: list[tuple[int, str]] = []
                assert wait_until(lambda: seen.append(agent.probe("/readyz")) or seen[-1][0] == 503, timeout=5)
                assert "programs not attached" in seen[-1][1], seen[-1]
                assert "rtml_cgroup" not in seen[-1][1]  # no figures
                assert agent.probe("/healthz") == (200, "ok\n")  # alive, only not ready
                assert wait_until(lambda: agent.probe("/readyz") == (200, "ready\n"), timeout=10), agent.text()
                assert "attached again" in agent.text()
                assert sorted(os.listdir(f"{pin_dir}/links")), "pinned again"
            finally:
                agent.stop()
        finally:
            first.stop()
            subprocess.run([sys.executable, "-m", "rtml_ebpf.cli", "agent", "--unload", "--pin-dir", pin_dir],
                           check=True, capture_output=True, timeout=60)


def test_readyz_unready_when_the_socket_is_removed() -> None:
    with make_cgroup(limit=64 * MiB) as cg:
        agent = AgentProcess(glob_for(cg))
        try:
            assert wait_until(lambda: agent.probe("/readyz")[0] == 200, timeout=5)
            os.unlink(agent.socket)
            assert wait_until(lambda: agent.probe("/readyz")[0] == 503, timeout=5)
            assert "no longer this agent's socket" in agent.probe("/readyz")[1]
        finally:
            agent.stop()


def test_a_stuck_loop_fails_healthz_and_stops_the_watchdog(tmp_path) -> None:
    stall = str(tmp_path / "stall")
    notify_path = tempfile.mktemp(prefix="rtml-notify-", dir="/tmp")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(notify_path)
    sock.settimeout(0.1)
    try:
        with make_cgroup(limit=64 * MiB) as cg:
            env = {"RTML_AGENT_TEST_STALL_FILE": stall, "NOTIFY_SOCKET": notify_path, "WATCHDOG_USEC": "1000000"}
            agent = AgentProcess(glob_for(cg), env=env)
            try:
                got = _datagrams(sock, 1.5)
                assert "READY=1" in got and got.count("WATCHDOG=1") >= 2, got
                assert agent.probe("/healthz") == (200, "ok\n")
                open(stall, "w").close()  # TEST ONLY hook: the loop sleeps while this file exists
                time.sleep(0.5)
                _datagrams(sock, 0.2)
                assert wait_until(lambda: agent.probe("/healthz", timeout=2)[0] == 503, timeout=10)
                status, body = agent.probe("/healthz")
                assert status == 503 and "loop has not iterated" in body
                assert agent.probe("/readyz")[0] == 503
                assert "WATCHDOG=1" not in _datagrams(sock, 1.5)  # systemd would restart it
                os.unlink(stall)
                assert wait_until(lambda: agent.probe("/healthz")[0] == 200, timeout=5)
                assert "WATCHDOG=1" in _datagrams(sock, 1.5)
            finally:
                agent.stop()
    finally:
        sock.close()
        os.unlink(notify_path)


def _datagrams(sock: socket.socket, seconds: float) -> list[str]:
    out, end = [], time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            out.append(sock.recv(4096).decode())
        except TimeoutError:
            pass
    return out
