"""The page-fault storm that P3 and P9 time (storm.c), and the kernel's BPF run-time accounting."""

from __future__ import annotations

import json
import os
import subprocess
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
MIB, ROUNDS = 64, 30  # each run faults 64 MiB in, 30 times
PAGES = (MIB << 20) // 4096 * ROUNDS
STATS = "/proc/sys/kernel/bpf_stats_enabled"


def compile_storm(out_dir: str) -> str:
    exe = os.path.join(out_dir, "storm")
    subprocess.run(["cc", "-O2", "-o", exe, os.path.join(HERE, "storm.c")], check=True)
    return exe


def storm_seconds(storm: str, cg: Any) -> float:
    """One storm inside the cgroup ``cg`` (a ChildCgroup): its wall time in seconds."""
    p = cg.popen([storm, str(MIB), str(ROUNDS)], stdout=subprocess.PIPE)
    out, _ = p.communicate(timeout=120)
    return float(out.split()[0])


def bpf_stats_setting() -> str:
    with open(STATS) as f:
        return f.read().strip()


def set_bpf_stats(on: str) -> None:
    """Program run-time accounting on ("1") or off ("0"): it adds two clock reads per run."""
    with open(STATS, "w") as f:
        f.write(on)


def bpf_run_stats(prog_ids: dict[str, int]) -> dict[str, tuple[int, int]]:
    """(run_time_ns, run_cnt) of each program, by name."""
    out = {}
    for name, pid in prog_ids.items():
        info = json.loads(subprocess.run(["bpftool", "-j", "prog", "show", "id", str(pid)], capture_output=True,
                                         text=True, check=True).stdout)
        out[name] = (int(info.get("run_time_ns", 0)), int(info.get("run_cnt", 0)))
    return out
