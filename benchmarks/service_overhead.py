"""P7, the overhead a real service sees: requests/s of the demo service with no program attached
and with each hook set watching its cgroup, interleaved."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from typing import Any

from benchmarks.common import HOOK_SETS, MiB, med, spread


def p7_service_overhead(reps: int) -> dict[str, Any]:
    """The overhead a real service sees: requests/s of the unguarded demo service (threaded
    http.server) on an allocating request (24 MiB in 1 MiB chunks) and a JSON request (parse
    5 MB), with no program attached and with each hook set watching its cgroup, interleaved."""
    import http.client

    import rtml_ebpf
    from benchmarks.cgroups import ChildCgroup
    from rtml_ebpf.demo.flood import free_port, wait_listening

    def rate(port: int, path: str, n: int) -> float:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        t0 = time.perf_counter()
        for _ in range(n):
            conn.request("GET", path)
            conn.getresponse().read()
            conn.close()
        return n / (time.perf_counter() - t0)

    results: dict[str, dict[str, list[float]]] = {}
    env_before = os.environ.get("RTML_HOOKS")
    try:
        with ChildCgroup(1024 * MiB, prefix="rtml-bench") as cg:
            port = free_port()
            p = cg.popen([sys.executable, "-m", "rtml_ebpf.demo.service", "--guard", "none", "--hold", "0",
                          "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            wait_listening(port, p)
            for path, n in (("/work", 60), ("/json", 20)):
                rate(port, path, n // 2)  # warm-up
                for _ in range(reps):
                    results.setdefault(path, {}).setdefault("none", []).append(rate(port, path, n))
                    for hook_set, env in HOOK_SETS.items():
                        os.environ["RTML_HOOKS"] = env
                        with rtml_ebpf.Limiter(cg.directory, backend="ebpf", relief=False):
                            results[path].setdefault(hook_set, []).append(rate(port, path, n))
    finally:
        if env_before is None:
            os.environ.pop("RTML_HOOKS", None)
        else:
            os.environ["RTML_HOOKS"] = env_before
    out: dict[str, Any] = {}
    for path, by in results.items():
        base = by["none"]
        out[path] = {"base_rps": med(base)}
        for hook_set in HOOK_SETS:
            slow = [(b / w - 1) * 100 for b, w in zip(base, by[hook_set], strict=True)]
            out[path][hook_set] = {"overhead_pct": med(slow), "spread_pct": spread(slow)}
    return out
