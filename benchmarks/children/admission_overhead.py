"""P6's child, run in a limited cgroup: microseconds per try_admit + finish, and per check at the door.

Wall time, as before, and the requesting thread's CPU time: on a shared machine the wall time also
holds the time other processes had the core (the door check is the gauge of that).

argv[1]: the ledger directory. Prints one JSON line.
"""

import json
import os
import sys
import time

from rtml_ebpf import Admission, Limiter

os.environ["RTML_LEDGER_DIR"] = sys.argv[1]
lim = Limiter(backend="ebpf", relief=False, metric="usage", threshold=0.99)
adm = Admission(lim, request_bytes=1 << 20)
n = 20000
for _ in range(2000):
    adm.finish(adm.try_admit("GET /x"))
t0, c0 = time.perf_counter(), time.thread_time()
for _ in range(n):
    adm.finish(adm.try_admit("GET /x"))
t1, c1 = time.perf_counter(), time.thread_time()
for _ in range(n):
    lim.is_mem_limit_reached()
t2 = time.perf_counter()
print(json.dumps({"admission_us": (t1 - t0) / n * 1e6, "admission_cpu_us": (c1 - c0) / n * 1e6,
                  "door_us": (t2 - t1) / n * 1e6}))
