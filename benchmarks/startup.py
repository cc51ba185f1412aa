"""P4, start-up: the time to import rtml_ebpf and make the first eBPF Limiter (load, verify,
attach), and the RSS they add, in a fresh interpreter each time (children/startup.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

from benchmarks.common import child, med, spread


def p4_startup(reps: int) -> dict[str, Any]:
    runs = []
    for _ in range(reps):
        out = subprocess.run([sys.executable, child("startup")], capture_output=True, text=True, check=True)
        runs.append(json.loads(out.stdout))
    return {k: {"median": med([r[k] for r in runs]), "spread": spread([r[k] for r in runs])}
            for k in ("import_s", "limiter_s", "total_s", "rss_bytes")}
