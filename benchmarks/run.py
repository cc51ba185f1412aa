"""``make bench``: every performance figure rtml-ebpf claims, measured in one run.

P1 check cost, P2 overshoot, P3 probe overhead per hook set, P4 start-up, P5 flood survival
(the demo), P6 admission (overhead, cost error, goodput), P7 overhead a real service sees,
P8 precision per hook set (time to clear after a free, working-set error), P9 the node agent
at scale (1,000 watched cgroups: RSS, register latency, storm overhead, per-event run time),
P10 the node view, P11 node cost against the number of guarded processes (1, 8, 32; shared load,
node agent, own loads), P12 request-level admission (time to end an overrunning request,
goodput of a heavy-tail upload flood). This machine is noisy: variants are interleaved, repeated, and reported as
median and spread (min-max). Ratios are taken against baselines from the
same run. Nothing here is asserted: the report states figures and targets.

Each scenario is a module of its own (SCENARIOS below names it); the child programs they run are
in benchmarks/children/ and workloads.py; report.py writes report.md and the plots. This module
is the command line: which scenarios, how many repeats, where the results go.

    python -m benchmarks.run [--quick] [--only P1,P3] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any

from benchmarks.admission import p6_admission
from benchmarks.agent_scale import p9_agent_scale
from benchmarks.check_cost import p1_check_cost
from benchmarks.common import HERE, machine
from benchmarks.faultstorm import compile_storm
from benchmarks.flood import p5_flood
from benchmarks.node_cost import p11_node_cost
from benchmarks.node_view import p10_node_view
from benchmarks.overshoot import p2_overshoot
from benchmarks.precision import p8_precision
from benchmarks.probe_overhead import p3_probe_overhead
from benchmarks.report import write_plots, write_report
from benchmarks.requests_bench import p12_requests
from benchmarks.service_overhead import p7_service_overhead
from benchmarks.startup import p4_startup


def scenarios(args: argparse.Namespace) -> list[tuple[str, Callable[[], dict[str, Any]]]]:
    """Every scenario in report order, with its repeats for a full or a --quick run."""
    reps = 3 if args.quick else 7
    return [
        ("P1", lambda: p1_check_cost(reps, 200_000 if args.quick else 1_000_000)),
        ("P2", lambda: p2_overshoot(2 if args.quick else 5)),
        ("P3", lambda: p3_probe_overhead(reps, args.out)),
        ("P4", lambda: p4_startup(reps)),
        ("P5", lambda: p5_flood(args.out, 6 if args.quick else 12)),
        ("P6", lambda: p6_admission(2 if args.quick else 5, args.out, 8 if args.quick else 20)),
        ("P7", lambda: p7_service_overhead(3 if args.quick else 7)),
        ("P8", lambda: p8_precision(2 if args.quick else 5, args.out)),
        ("P9", lambda: p9_agent_scale(2 if args.quick else 3, compile_storm(args.out))),
        ("P10", lambda: p10_node_view(5 if args.quick else 20, 10 if args.quick else 30)),
        ("P11", lambda: p11_node_cost(2 if args.quick else 5, compile_storm(args.out))),
        ("P12", lambda: p12_requests(10 if args.quick else 40, 8 if args.quick else 20)),
    ]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--quick", action="store_true", help="fewer repeats (a smoke run)")
    ap.add_argument("--only", default="P1,P2,P3,P4,P5,P6,P7,P8,P9,P10,P11,P12")
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    ap.add_argument("--merge", action="store_true",
                    help="keep the sections of --out/results.json that this run does not measure (say which run "
                         "each comes from in the report)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("benchmarks: run as root (they load BPF programs and create memory cgroups)", file=sys.stderr)
        return 4
    os.makedirs(args.out, exist_ok=True)
    only = {s.strip().upper() for s in args.only.split(",")}
    res: dict[str, Any] = {"machine": machine()}
    for name, fn in scenarios(args):
        if name in only:
            print(f"benchmarks: {name} ...", file=sys.stderr, flush=True)
            t = time.monotonic()
            res[name] = fn()
            print(f"benchmarks: {name} done in {time.monotonic() - t:.0f} s", file=sys.stderr, flush=True)
    path_json = os.path.join(args.out, "results.json")
    if args.merge and os.path.exists(path_json):
        with open(path_json) as f:
            old = json.load(f)
        ran = sorted(k for k in res if k.startswith("P"))
        kept = sorted(k for k in old if k.startswith("P") and k not in res)
        sources = {**old.get("sections_from", {k: old["machine"]["date"] for k in kept})}
        sources = {k: v for k, v in sources.items() if k in kept}
        sources.update({k: res["machine"]["date"] for k in ran})
        res = {**{k: old[k] for k in kept}, **res, "sections_from": dict(sorted(sources.items()))}
    with open(path_json, "w") as f:
        json.dump(res, f, indent=2)
    write_plots(res, args.out)
    path = write_report(res, args.out)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
