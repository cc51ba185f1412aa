"""P2, overshoot: how far a process allocating as fast as it can gets past the threshold before
the check flips, per backend and poll interval."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

from benchmarks.common import WORKLOADS, MiB, med, spread


def p2_overshoot(reps: int) -> dict[str, Any]:
    from benchmarks.cgroups import ChildCgroup

    limit, threshold, max_mib = 1024 * MiB, 256 * MiB, 700
    variants = {"ebpf": ("ebpf", None), "ebpf (lean hooks)": ("ebpf-lean", None), "poll 10 ms": ("poll", 0.010),
                "poll 100 ms": ("poll", 0.100), "poll 1 s": ("poll", 1.0)}
    results: dict[str, list[dict[str, Any]]] = {k: [] for k in variants}
    for _ in range(reps):
        for name, (backend, interval) in variants.items():
            with ChildCgroup(limit, prefix="rtml-bench") as cg:
                args = [sys.executable, WORKLOADS, "alloc", "--threshold", str(threshold),
                        "--backend", backend.split("-")[0], "--metric", "usage", "--step-kib", "1024",
                        "--max-mib", str(max_mib), "--fast"]
                if interval is not None:
                    args += ["--poll-interval", str(interval)]
                env = {"RTML_HOOKS": "lean"} if backend.endswith("lean") else {}
                p = cg.popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                out, err = p.communicate(timeout=300)
                if p.returncode != 0:
                    raise RuntimeError(f"P2 {name}: workload failed: {err[-2000:]}")
                r = json.loads(out.strip().splitlines()[-1])
                rate = r["allocated"] / r["seconds"] / MiB if r["seconds"] else 0.0
                results[name].append({"overshoot": r["overshoot"], "tripped": r["tripped"], "rate_mib_s": rate,
                                      "allocated": r["allocated"]})
    rows = {}
    for name, rs in results.items():
        flipped = [x["overshoot"] / MiB for x in rs if x["tripped"]]
        rows[name] = {
            "median_mib": med(flipped) if flipped else None,
            "spread_mib": spread(flipped) if flipped else "-",
            "not_flipped": sum(not x["tripped"] for x in rs),
            "rate_mib_s": med([x["rate_mib_s"] for x in rs]),
        }
    return {"limit": limit, "threshold": threshold, "max_mib": max_mib, "rows": rows}
