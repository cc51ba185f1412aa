"""``rtml-ebpf watch`` for real: against a running agent (its /metrics) and standalone, on
cgroups holding known amounts of memory."""

from __future__ import annotations

import json
import os
import pty
import select
import signal
import subprocess
import sys
import time

import pytest
from support.agent import REPO, AgentProcess, glob_for
from support.cgroups import MiB, make_cgroup, needs_bpf, needs_cgroups

from rtml_ebpf import _cgroup

pytestmark = [pytest.mark.root, needs_bpf, needs_cgroups]
BATCH = 64 * 4096 * (os.cpu_count() or 1)  # the page counter's per-CPU slack


def watch(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "rtml_ebpf.cli", "watch", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=120)


def path_of(directory: str) -> str:
    return _cgroup.cgroup_from_directory(directory).path


def test_watch_reads_the_agent_sorted_by_least_headroom_and_filtered() -> None:
    with make_cgroup() as parent, make_cgroup(limit=128 * MiB, parent=parent) as tight, \
            make_cgroup(limit=256 * MiB, parent=parent) as roomy:
        agent = AgentProcess(glob_for(parent))
        try:
            a, b = tight.hold(), roomy.hold()
            a.change(60)
            b.change(20)
            time.sleep(0.6)
            url = agent.metrics_url()
            out = watch("--agent", url, "--once", "--json")
            only = watch("--agent", url, "--once", "--json", "--filter", "*/" + os.path.basename(roomy.directory))
            screen = watch("--agent", url, "--once")
        finally:
            agent.stop()
        assert out.returncode == 0, out.stderr
        rows = json.loads(out.stdout)
        assert [r["cgroup"] for r in rows[:2]] == [path_of(tight.directory), path_of(roomy.directory)], rows
        first = rows[0]
        assert first["limit_bytes"] == 128 * MiB
        assert abs(first["usage_bytes"] - tight.usage()) <= BATCH, (first, tight.usage())
        assert first["headroom_bytes"] == first["limit_bytes"] - first["usage_bytes"]
        assert first["usage_bytes"] >= 60 * MiB and first["oom_kills"] == 0
        assert rows[-1]["limit_bytes"] is None  # the unlimited parent sorts last
        assert [r["cgroup"] for r in json.loads(only.stdout)] == [path_of(roomy.directory)]
        assert screen.returncode == 0 and "least headroom" in screen.stdout
        assert os.path.basename(tight.directory) in screen.stdout and "128.0 MiB" in screen.stdout


def test_watch_standalone_loads_its_own_programs_and_shows_threshold_and_growth() -> None:
    with make_cgroup(limit=256 * MiB) as cg:
        grower = cg.popen([sys.executable, "-c", "import time\nx = []\nfor _ in range(80):\n"
                           "    x.append(bytearray(1 << 20)); time.sleep(0.05)\ntime.sleep(60)"])
        try:
            time.sleep(0.5)
            out = watch("--cgroup", cg.directory, "--once", "--json", "--threshold", "0.5")
        finally:
            grower.kill()
            grower.wait()
        assert out.returncode == 0, out.stderr
        (row,) = json.loads(out.stdout)
        assert row["cgroup"] == path_of(cg.directory) and row["limit_bytes"] == 256 * MiB
        assert row["threshold_bytes"] == 128 * MiB
        # about 20 MiB/s (1 MiB every 50 ms, plus the interpreter's own pages)
        assert row["growth_bytes_per_s"] is not None and 8 * MiB < row["growth_bytes_per_s"] < 40 * MiB, row
        assert row["seconds_to_limit"] is not None and row["seconds_to_limit"] > 0


def test_live_view_refreshes_until_interrupted() -> None:
    with make_cgroup(limit=64 * MiB) as cg:
        agent = AgentProcess(glob_for(cg))
        master, slave = pty.openpty()
        p = subprocess.Popen([sys.executable, "-m", "rtml_ebpf.cli", "watch", "--agent", agent.metrics_url(),
                              "--interval", "0.1"], cwd=REPO, stdin=slave, stdout=slave, stderr=slave,
                             env={**os.environ, "COLUMNS": "200", "LINES": "40", "TERM": "xterm"})
        os.close(slave)
        seen = b""
        try:
            deadline = time.monotonic() + 20
            while seen.count(b"rtml-ebpf watch") < 4 and time.monotonic() < deadline:
                ready, _, _ = select.select([master], [], [], 0.5)
                if ready:
                    seen += os.read(master, 65536)
            p.send_signal(signal.SIGINT)
            rc = p.wait(timeout=10)
            ready, _, _ = select.select([master], [], [], 0.2)
            if ready:
                try:
                    seen += os.read(master, 65536)
                except OSError:
                    pass
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
            os.close(master)
            agent.stop()
        assert seen.count(b"rtml-ebpf watch") >= 4, seen[-2000:]  # frame after frame
        assert os.path.basename(cg.directory).encode() in seen
        assert rc == 0 and b"Traceback" not in seen
