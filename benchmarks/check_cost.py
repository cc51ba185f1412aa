"""P1, check cost: one memory check as a caller writes it (attribute lookup plus call), the
eBPF backend against an empty method, the poll backend cached and not, a direct read of the
usage file and psutil's RSS; interleaved."""

from __future__ import annotations

import os
import timeit
from typing import Any

import psutil

from benchmarks.common import med, spread


class _Empty:
    def method(self) -> bool:
        return False


def p1_check_cost(reps: int, number: int) -> dict[str, Any]:
    import rtml_ebpf

    ebpf = rtml_ebpf.Limiter(backend="ebpf")
    poll = rtml_ebpf.Limiter(backend="poll")  # default 10 ms cache
    poll0 = rtml_ebpf.Limiter(backend="poll", poll_interval=0)
    usage_file = os.path.join(ebpf.cgroup.directory, ebpf.cgroup.usage_file)
    proc = psutil.Process()
    empty = _Empty()

    def read_file() -> bool:
        with open(usage_file) as f:
            return int(f.read()) > 0

    # Each variant is timed as a caller writes it: attribute lookup plus call.
    env = {"empty": empty, "ebpf": ebpf, "poll": poll, "poll0": poll0, "rtml_ebpf": rtml_ebpf,
           "read_file": read_file, "proc": proc}
    variants: dict[str, tuple[str, int]] = {
        "empty method call": ("empty.method()", number),
        "ebpf Limiter.is_mem_limit_reached": ("ebpf.is_mem_limit_reached()", number),
        "rtml_ebpf.is_mem_limit_reached (module)": ("rtml_ebpf.is_mem_limit_reached()", number),
        "poll Limiter (10 ms cache)": ("poll.is_mem_limit_reached()", number),
        "poll Limiter (no cache)": ("poll0.is_mem_limit_reached()", max(1, number // 200)),
        "direct read of the usage file": ("read_file()", max(1, number // 200)),
        "psutil RSS": ("proc.memory_info().rss", max(1, number // 200)),
    }
    rtml_ebpf.configure(backend="ebpf")
    rtml_ebpf.is_mem_limit_reached()
    samples: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(reps):  # interleaved
        for name, (stmt, n) in variants.items():
            samples[name].append(timeit.timeit(stmt, number=n, globals=env) / n * 1e9)
    for lim in (ebpf, poll, poll0):
        lim.close()
    rtml_ebpf.configure(backend="auto")
    rows = {k: {"median_ns": med(v), "spread_ns": spread(v)} for k, v in samples.items()}
    e = rows["ebpf Limiter.is_mem_limit_reached"]["median_ns"]
    return {
        "rows": rows,
        "file_read_over_ebpf": rows["direct read of the usage file"]["median_ns"] / e,
        "ebpf_over_empty": e / rows["empty method call"]["median_ns"],
        "psutil_over_ebpf": rows["psutil RSS"]["median_ns"] / e,
        "poll_nocache_over_ebpf": rows["poll Limiter (no cache)"]["median_ns"] / e,
    }
