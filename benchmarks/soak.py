"""``make soak``: the demo's flood against a guarded pre-fork service for 10 minutes.

Every second it samples the cgroup's usage, each process's RSS and open fds, and the service's
served/rejected counts; the report (benchmarks/results/soak.md and soak.json) compares the
first and the last minute. The pass mark: RSS and fds flat (last minute's median within 10%
of the first's, fds within 2), and no OOM kill. Not part of CI (it takes 10 minutes).

    python -m benchmarks.soak [--minutes 10] [--out benchmarks/results]

The node agent's soak against 100 hostile clients (malformed, churning, slow) beside honest ones
is benchmarks/soak_agent.py: ``python -m benchmarks.soak_agent --minutes 2``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from typing import Any

from rtml_ebpf.demo.flood import Flood, gunicorn_server

MiB = 1 << 20
HERE = os.path.dirname(os.path.abspath(__file__))


def process_figures(pids: list[int]) -> tuple[int, int]:
    rss = fds = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/statm") as f:
                rss += int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
            fds += len(os.listdir(f"/proc/{pid}/fd"))
        except OSError:
            continue
    return rss, fds


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("soak: run as root (it creates memory cgroups and loads BPF programs)", file=sys.stderr)
        return 4
    duration = args.minutes * 60
    flood = Flood("soak", "admission", gunicorn_server("admission", env={"RTML_THRESHOLD": "0.8",
                                                                          "RTML_METRIC": "usage"}),
                  limit=256 * MiB, duration=duration, clients=48)
    samples: list[dict[str, Any]] = []
    start = flood.start_service

    def remember(cg: Any) -> None:
        flood.cg = cg  # type: ignore[attr-defined]
        start(cg)

    def sample() -> None:
        while not flood.stop.is_set():
            cg = getattr(flood, "cg", None)
            if cg is not None:
                pids = cg.members()
                rss, fds = process_figures(pids)
                try:
                    usage = cg.usage()
                except OSError:
                    return
                samples.append({"t": round(time.monotonic() - flood.t0, 1), "usage": usage, "rss": rss, "fds": fds,
                                "procs": len(pids), "served": flood.r.served, "rejected": flood.r.rejected})
                if len(samples) % 60 == 0:
                    print(f"soak: {samples[-1]['t']:.0f} s  rss {rss / MiB:.0f} MiB  fds {fds}  "
                          f"served {flood.r.served}", file=sys.stderr, flush=True)
            time.sleep(1.0)

    flood.start_service = remember  # type: ignore[method-assign]
    t = threading.Thread(target=sample, daemon=True)
    t.start()
    r = flood.run()
    t.join(timeout=5)
    minute = [s for s in samples if s["t"] <= 60]
    last = [s for s in samples if s["t"] >= samples[-1]["t"] - 60] if samples else []

    def med(rows: list[dict[str, Any]], key: str) -> float:
        return statistics.median(x[key] for x in rows) if rows else 0.0

    rss0, rss1, fd0, fd1 = med(minute, "rss"), med(last, "rss"), med(minute, "fds"), med(last, "fds")
    flat = bool(samples) and rss1 <= rss0 * 1.1 and fd1 <= fd0 + 2 and r.oom_kills == 0
    os.makedirs(args.out, exist_ok=True)
    result = {"minutes": args.minutes, "oom_kills": r.oom_kills, "served": r.served, "rejected": r.rejected,
              "failed": r.failed, "rss_first_minute": rss0, "rss_last_minute": rss1, "fds_first_minute": fd0,
              "fds_last_minute": fd1, "pass": flat, "samples": samples}
    with open(os.path.join(args.out, "soak.json"), "w") as f:
        json.dump(result, f)
    with open(os.path.join(args.out, "soak.md"), "w") as f:
        f.write(f"# soak: {args.minutes:g} minutes of flood, gunicorn pre-fork, admission\n\n"
                f"- OOM kills {r.oom_kills}, served {r.served}, rejected {r.rejected}, failed {r.failed}\n"
                f"- RSS summed over the processes (shared pages counted in each): first minute "
                f"{rss0 / MiB:.1f} MiB, last minute {rss1 / MiB:.1f} MiB\n"
                f"- open fds first minute {fd0:.0f}, last minute {fd1:.0f}\n"
                f"- flat (RSS within 10%, fds within 2, no OOM kill): **{'pass' if flat else 'FAIL'}**\n")
    print(os.path.join(args.out, "soak.md"))
    return 0 if flat else 1


if __name__ == "__main__":
    sys.exit(main())
