"""A client of the node's shared load (or of any backend) for the tests: builds ``Limiter()`` on
its own cgroup (or SHARED_CLIENT_CGROUP's; ``auto`` unless argv[2] names a backend), prints what it got and how long the
build took, then answers one JSON line per command read on stdin:

    grow N    allocate and touch N MiB more          -> {"held_mib": ...}
    shrink N  free N MiB                             -> {"held_mib": ...}
    check     the verdict and a reading              -> {"reached", "backend", "usage", "updated_ns", ...}
    meter N   a new thread allocates N MiB: what its per-thread meter saw -> {"source", "allocated", "measured"}
"""

from __future__ import annotations

import json
import mmap
import os
import sys
import threading
import time
from typing import Any

import rtml_ebpf  # noqa: F401 - imported before the clock starts: the build is timed, not the import
from rtml_ebpf import Limiter

MiB = 1 << 20


def touch(buf: mmap.mmap) -> None:
    for off in range(0, len(buf), 4096):
        buf[off] = 1


def meter(lim: Limiter, n_mib: int) -> dict[str, Any]:
    out: dict[str, Any] = {}

    def work() -> None:
        m = lim.thread_meter()
        out["source"] = None if m is None else m.source
        if m is None:
            return
        base = m.begin()
        bufs = [mmap.mmap(-1, MiB) for _ in range(n_mib)]
        for b in bufs:
            touch(b)
        _, peak = m.read()
        for b in bufs:
            b.close()
        out["allocated"], out["measured"] = n_mib * MiB, peak - base

    t = threading.Thread(target=work)
    t.start()
    t.join()
    return out


def main() -> int:
    threshold = float(sys.argv[1]) if len(sys.argv) > 1 else 0.5
    backend = sys.argv[2] if len(sys.argv) > 2 else "auto"
    t0 = time.perf_counter()
    # SHARED_CLIENT_CGROUP: watch that cgroup (a root service guarding another), not our own
    lim = Limiter(threshold=threshold, metric="usage", relief=False, backend=backend,
                  cgroup=os.environ.get("SHARED_CLIENT_CGROUP") or None)
    build_ms = (time.perf_counter() - t0) * 1000
    print(json.dumps({"backend": lim.backend, "reason": lim.stats().backend_reason, "build_ms": build_ms,
                      "pid": os.getpid(), "hooks": list(lim.stats().hooks)}), flush=True)
    held: list[mmap.mmap] = []
    for line in sys.stdin:
        cmd, _, arg = line.strip().partition(" ")
        if cmd == "grow":
            for _ in range(int(arg)):
                b = mmap.mmap(-1, MiB)
                touch(b)
                held.append(b)
            reply: dict[str, Any] = {"held_mib": len(held)}
        elif cmd == "shrink":
            for _ in range(min(int(arg), len(held))):
                held.pop().close()
            reply = {"held_mib": len(held)}
        elif cmd == "check":
            s = lim.stats()
            reply = {"reached": lim.is_mem_limit_reached(), "backend": s.backend, "reason": s.backend_reason,
                     "usage": s.usage_bytes, "updated_ns": s.updated_ns, "now_ns": time.monotonic_ns()}
        elif cmd == "meter":
            reply = meter(lim, int(arg))
        else:
            reply = {"error": f"unknown command {cmd!r}"}
        print(json.dumps(reply), flush=True)
    lim.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
