"""P6, admission: overhead per admitted request (children/admission_overhead.py), the error of
the measured per-request cost (workloads.py cost), and the goodput of the guarded pre-fork flood."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any

from benchmarks.common import WORKLOADS, MiB, child, med, spread


def p6_admission(reps: int, tmp: str, duration: float) -> dict[str, Any]:
    """Admission: overhead per request, error of the measured cost, and goodput of the guarded
    pre-fork flood as a share of the ideal concurrency (threshold - idle usage) / cost."""
    from benchmarks.cgroups import ChildCgroup

    over, door, errs = [], [], []
    for _ in range(reps):
        with ChildCgroup(512 * MiB, prefix="rtml-bench") as cg:
            p = cg.popen([sys.executable, child("admission_overhead"), tmp], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
            out, err = p.communicate(timeout=300)
            if p.returncode != 0:
                raise RuntimeError(f"P6 overhead: {err[-2000:]}")
            r = json.loads(out)
            over.append(r["admission_us"])
            door.append(r["door_us"])
            p = cg.popen([sys.executable, WORKLOADS, "cost", tmp], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
            out, err = p.communicate(timeout=300)
            if p.returncode != 0:
                raise RuntimeError(f"P6 cost: {err[-2000:]}")
            costs = json.loads(out)
            errs.append(max(abs(m - a) / a for a, m in (*costs["threads"].values(), *costs["async"].values())))
    return {"admission_us": {"median": med(over), "spread": spread(over)},
            "door_us": {"median": med(door), "spread": spread(door)},
            "cost_max_error": {"median": med(errs), "spread": spread(errs)},
            "goodput": p6_goodput(duration)}


def p6_goodput(duration: float) -> dict[str, Any]:
    import http.client
    import statistics as st
    import threading

    from rtml_ebpf.admission.ledger import read_totals
    from rtml_ebpf.demo.flood import Flood, gunicorn_server

    limit, threshold = 256 * MiB, 0.8
    flood = Flood("admission", "admission", gunicorn_server(
        "admission", env={"RTML_THRESHOLD": str(threshold), "RTML_METRIC": "usage"}),
        limit=limit, duration=duration, clients=48)
    inflight: list[int] = []
    idle: list[int] = []
    est: list[int] = []
    start = flood.start_service

    def warm_start(cg: Any) -> None:
        start(cg)
        if idle:
            return
        for _ in range(12):  # each worker loads its programs and learns the route, one at a time
            conn = http.client.HTTPConnection("127.0.0.1", flood.port, timeout=10)
            conn.request("GET", "/work")
            conn.getresponse().read()
            conn.close()
        time.sleep(1.0)
        idle.append(cg.usage())
        flood.cgdir = cg.directory  # type: ignore[attr-defined]

    def sample() -> None:
        while not flood.stop.is_set() and not hasattr(flood, "cgdir"):
            time.sleep(0.05)
        while not flood.stop.is_set():
            # the service runs as root with this environment: its ledger is where ours would be
            totals = read_totals(os.stat(flood.cgdir).st_ino)  # type: ignore[attr-defined]
            if totals is None:
                time.sleep(0.02)
                continue
            inflight.append(totals.inflight)
            time.sleep(0.02)
        try:
            conn = http.client.HTTPConnection("127.0.0.1", flood.port, timeout=5)
            conn.request("GET", "/rtml-stats")
            routes = json.loads(conn.getresponse().read()).get("routes", [])
            est.extend(r["estimate"] for r in routes if r.get("estimate"))
        except (OSError, ValueError):
            pass

    flood.start_service = warm_start  # type: ignore[method-assign]
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    r = flood.run()
    sampler.join(timeout=10)
    cost = est[0] if est else 24 * MiB
    ideal = (threshold * limit - idle[0]) / cost if idle else 0.0
    mean_inflight = st.fmean(inflight) if inflight else 0.0
    return {"oom_kills": r.oom_kills, "served": r.served, "rejected": r.rejected, "failed": r.failed,
            "peak_bytes": r.peak_bytes, "idle_bytes": idle[0] if idle else None, "cost_bytes": cost,
            "ideal_concurrency": ideal, "mean_inflight": mean_inflight,
            "share": mean_inflight / ideal if ideal else 0.0}
