"""P4's child: import rtml_ebpf and make a Limiter in a fresh interpreter.

argv[1]: the backend ("ebpf": its own load, the default; "auto" with the shared load's
environment: start or adopt the node's shared load). Prints one JSON line: the seconds each step
took, the RSS they added together, and the backend with its reason.
"""

import json
import os
import sys
import time


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


r0 = rss()
t0 = time.perf_counter()
import rtml_ebpf  # noqa: E402  (the import is what is timed)

t1 = time.perf_counter()
lim = rtml_ebpf.Limiter(backend=sys.argv[1] if len(sys.argv) > 1 else "ebpf")
t2 = time.perf_counter()
r2 = rss()
print(json.dumps({"import_s": t1 - t0, "limiter_s": t2 - t1, "total_s": t2 - t0, "rss_bytes": r2 - r0,
                  "backend": lim.backend, "reason": lim.stats().backend_reason}))
lim.close()
