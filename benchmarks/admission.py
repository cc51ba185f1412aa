"""P6, admission: overhead per admitted request (children/admission_overhead.py), the error of
the measured per-request cost (workloads.py cost), and the goodput of the guarded pre-fork flood."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

from benchmarks.common import WORKLOADS, MiB, child, med, spread


def p6_admission(reps: int, tmp: str, duration: float) -> dict[str, Any]:
    """Admission: overhead per request, error of the measured cost, and goodput of the guarded
    pre-fork flood as a share of the ideal concurrency (threshold - idle usage) / cost."""
    from benchmarks.cgroups import ChildCgroup

    over, cpu, door, errs = [], [], [], []
    for _ in range(reps):
        with ChildCgroup(512 * MiB, prefix="rtml-bench") as cg:
            p = cg.popen([sys.executable, child("admission_overhead"), tmp], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
            out, err = p.communicate(timeout=300)
            if p.returncode != 0:
                raise RuntimeError(f"P6 overhead: {err[-2000:]}")
            r = json.loads(out)
            over.append(r["admission_us"])
            cpu.append(r["admission_cpu_us"])
            door.append(r["door_us"])
            p = cg.popen([sys.executable, WORKLOADS, "cost", tmp], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
            out, err = p.communicate(timeout=300)
            if p.returncode != 0:
                raise RuntimeError(f"P6 cost: {err[-2000:]}")
            costs = json.loads(out)
            errs.append(max(abs(m - a) / a for a, m in (*costs["threads"].values(), *costs["async"].values())))
    return {"admission_us": {"median": med(over), "spread": spread(over)},
            "admission_cpu_us": {"median": med(cpu), "spread": spread(cpu)},
            "door_us": {"median": med(door), "spread": spread(door)},
            "cost_max_error": {"median": med(errs), "spread": spread(errs)},
            "goodput": p6_goodput(duration)}


def p6_goodput(duration: float) -> dict[str, Any]:
    import statistics as st

    from benchmarks.goodput import measured_flood
    from rtml_ebpf.demo.flood import Flood, gunicorn_server

    limit, threshold = 256 * MiB, 0.8
    flood = Flood("admission", "admission", gunicorn_server(
        "admission", env={"RTML_THRESHOLD": str(threshold), "RTML_METRIC": "usage"}),
        limit=limit, duration=duration, clients=48)
    # each worker loads its programs and learns the route, one request at a time
    m = measured_flood(flood, [("GET", "/work", 0)] * 12)
    r = m.result
    est = [x["estimate"] for x in m.routes if x.get("estimate") and x.get("route") == "GET /work"]
    cost = est[0] if est else 24 * MiB
    ideal = (threshold * limit - m.idle_bytes) / cost if m.idle_bytes is not None else 0.0
    mean_inflight = st.fmean(m.inflight) if m.inflight else 0.0
    return {"oom_kills": r.oom_kills, "served": r.served, "rejected": r.rejected, "failed": r.failed,
            "peak_bytes": r.peak_bytes, "idle_bytes": m.idle_bytes, "cost_bytes": cost,
            "ideal_concurrency": ideal, "mean_inflight": mean_inflight,
            "share": mean_inflight / ideal if ideal else 0.0}
