"""The flood-survival demo in a short mode: unguarded dies, the eBPF-guarded service lives."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from support.cgroups import needs_bpf, needs_cgroups, open_checkout_to_nobody

from rtml_ebpf.ebpf import probes

pytestmark = pytest.mark.root
HOOKED = os.geteuid() == 0 and os.path.exists("/sys/kernel/btf/vmlinux") and \
    probes.hook_unavailable(next(h for h in probes.HOOKS if h.name == "oom_victim")) is None


@needs_bpf
@needs_cgroups
def test_demo_short_run(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "rtml_ebpf.cli", "demo", "--json", "--parts", "handler", "--duration", "6",
         "--clients", "24", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    runs = {r["guard"]: r for r in result["runs"]}
    assert runs["none"]["oom_kills"] >= 1
    assert runs["none"]["time_to_first_oom_s"] is not None
    if HOOKED:  # every kill the cgroup counted, with its victim process, from the OOM hook's ring
        victims = runs["none"]["oom_events"]
        # mark_victim fires per thread: dying threads of a killed process may add events; the
        # processes are the kills.
        assert len({v["pid"] for v in victims}) == runs["none"]["oom_kills"], victims
        assert runs["none"]["victim_processes"] == runs["none"]["oom_kills"]
        assert runs["none"]["victim_thread_marks"] == len(victims) - runs["none"]["oom_kills"]
        assert len({(v["pid"], v["tid"]) for v in victims}) == len(victims)  # a thread is marked once
        assert all("/rtml-flood-" in v["cgroup"] and v["pid"] and v["victim_rss_bytes"] for v in victims), victims
        assert "victims seen by the OOM hook" in out.stderr
    assert runs["ebpf"]["oom_events"] == []
    assert runs["ebpf"]["oom_kills"] == 0
    assert runs["ebpf"]["served"] > 0 and runs["ebpf"]["rejected"] > 0
    assert runs["ebpf"]["failed"] == 0
    assert runs["ebpf"]["peak_bytes"] < result["limit_bytes"]
    png = Path(result["plot"])
    assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / "flood.json").read_text())["samples"]["rtml-ebpf"]


def test_the_table_in_a_log_is_one_line_per_row_and_says_what_victims_count() -> None:
    from rtml_ebpf.demo import plain_table
    from rtml_ebpf.demo.flood import RunResult
    from rtml_ebpf.demo.witness import LEGEND

    ev = {"comm": "python", "victim_rss_anon_bytes": 100 << 20, "cgroup": "/rtml-flood-x"}
    killed = RunResult("pre-fork unguarded", "none", oom_kills=2, served=5, failed=3,
                       oom_events=[{**ev, "pid": 10, "tid": 10}, {**ev, "pid": 10, "tid": 11},
                                   {**ev, "pid": 12, "tid": 12}])
    text = plain_table([killed, RunResult("pre-fork admission, poll 10ms", "poll-admission", served=9)], 256 << 20)
    lines = text.splitlines()
    assert len(lines) == 5 and lines[-1] == LEGEND  # title, header, two rows, legend: nothing wrapped
    assert lines[2].startswith("pre-fork unguarded")
    assert "2 (python, anon RSS up to 100 MiB) +1 dying threads" in lines[2]
    assert "counter" not in lines[2]  # the processes are the kills
    assert lines[1].index("OOM kills") < lines[1].index("victims (OOM hook)")


@needs_bpf
@needs_cgroups
def test_demo_unprivileged_row_runs_through_the_node_agent(tmp_path: Path) -> None:
    open_checkout_to_nobody()
    out = subprocess.run(
        [sys.executable, "-m", "rtml_ebpf.cli", "demo", "--json", "--parts", "agent", "--duration", "6",
         "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr
    (run,) = json.loads(out.stdout)["runs"]
    assert run["part"] == "agent" and run["backend"] == "agent", run  # uid 65534, no bpf(): the agent's page
    assert run["oom_kills"] == 0 and run["served"] > 0 and run["rejected"] > 0, run


def test_demo_refuses_without_privileges_with_clear_message() -> None:
    cmd = [sys.executable, "-m", "rtml_ebpf.cli", "demo", "--duration", "1", "--out", "/tmp"]
    if os.geteuid() == 0:
        # Root without capabilities: what a locked-down container gets. (Dropping caps rather
        # than uid keeps the venv readable wherever CI cloned it.)
        out = subprocess.run(["setpriv", "--inh-caps=-all", "--bounding-set=-all", *cmd],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 4, (out.returncode, out.stderr)
        assert "CAP_BPF" in out.stderr and "run as root" in out.stderr
    else:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        assert out.returncode == 4, (out.returncode, out.stderr)
        assert "run it as root" in out.stderr
