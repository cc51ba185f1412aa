"""``rtml-ebpf status``: JSON keys are a contract; errors have their own exit codes."""

from __future__ import annotations

import json
import subprocess
import sys

KEYS = {"cgroup_path", "cgroup_dir", "cgroup_id", "cgroup_version", "limit_bytes", "limit_source", "usage_bytes",
        "working_set_bytes", "metric", "threshold_bytes", "headroom_bytes", "limit_headroom_bytes", "tripped",
        "backend", "backend_reason", "hooks", "oom_kills", "faults", "updated_ns", "growth_bytes_per_s",
        "seconds_to_limit", "tripped_ahead"}


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "rtml_ebpf.cli", *args], capture_output=True, text=True, timeout=60)


def test_status_json_has_stable_keys() -> None:
    out = cli("status", "--json", "--backend", "poll", "--threshold", "64Ki", "--metric", "usage")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert set(data) == KEYS
    assert data["backend"] == "poll" and data["threshold_bytes"] == 65536 and data["tripped"] is True


def test_status_table_names_the_backend_and_why() -> None:
    out = cli("status", "--backend", "poll")
    assert out.returncode == 0, out.stderr
    assert "backend" in out.stdout and "poll requested" in out.stdout and "effective limit" in out.stdout


def test_status_by_pid() -> None:
    out = cli("status", "--json", "--backend", "poll", "--pid", "1")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["cgroup_dir"]


def test_exit_codes_name_the_problem() -> None:
    missing = cli("status", "--cgroup", "/nonexistent")
    assert missing.returncode == 3 and "no such directory" in missing.stderr
    bad = cli("status", "--threshold", "7.5")
    assert bad.returncode == 2 and "--threshold=7.5" in bad.stderr
    both = cli("status", "--cgroup", "/x", "--pid", "1")
    assert both.returncode == 2 and "not allowed with" in both.stderr
