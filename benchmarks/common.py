"""What every scenario shares: units, paths, the median and spread the report states, the hook
sets compared, and the machine a run was on."""

from __future__ import annotations

import os
import platform
import statistics
import time
from typing import Any

import psutil

MiB = 1 << 20
HERE = os.path.dirname(os.path.abspath(__file__))
CHILDREN = os.path.join(HERE, "children")  # the child programs the scenarios run, as files
WORKLOADS = os.path.join(HERE, "workloads.py")
HOOK_SETS = {"memcg": "auto", "lean": "lean"}  # report name -> RTML_HOOKS


def child(name: str) -> str:
    """The path of benchmarks/children/<name>.py."""
    return os.path.join(CHILDREN, f"{name}.py")


def med(xs: list[float]) -> float:
    return statistics.median(xs)


def spread(xs: list[float]) -> str:
    return f"{min(xs):.4g}–{max(xs):.4g}" if xs else "-"


def machine() -> dict[str, Any]:
    cpu = "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "?")
    except OSError:
        pass
    return {"kernel": platform.release(), "cpu": cpu, "cores": os.cpu_count(),
            "memory_gib": round(psutil.virtual_memory().total / 2**30, 1), "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
