"""What ``Admission.stats().meter`` says while some threads fall back to getrusage (issue 19's
review, item 2): a Limiter on the node agent, then 16 threads starting requests at once (the
meter asks the agent for at most 8 new threads a second; the rest measure with getrusage). Run
by tests/root/test_agent_meter_source.py as uid 65534 in a test cgroup; prints one JSON line."""

from __future__ import annotations

import json
import sys
import threading
import time

from rtml_ebpf import Admission, Limiter

THREADS = 16


def main() -> None:
    lim = Limiter(backend="agent", threshold=0.99, metric="usage", relief=False)
    adm = Admission(lim, request_bytes=1 << 20)
    adm.finish(adm.try_admit("GET /one"))  # this thread registers with the agent's meter
    alone = adm.stats().meter
    meter = lim.thread_meter()
    time.sleep(1.1)  # (out of the meter's window of asks)
    started, leave = threading.Barrier(THREADS + 1), threading.Event()

    def request() -> None:
        ticket = adm.try_admit("GET /many")
        started.wait()
        leave.wait()
        if ticket is not None:
            adm.finish(ticket)

    threads = [threading.Thread(target=request) for _ in range(THREADS)]
    for t in threads:
        t.start()
    started.wait()
    during, during_stats = adm.stats().meter, meter.stats()  # type: ignore[union-attr]
    leave.set()
    for t in threads:
        t.join()
    deadline = time.monotonic() + 2.0  # (a joined thread's OS thread may still be leaving /proc)
    while (after := adm.stats().meter) != "agent" and time.monotonic() < deadline:
        time.sleep(0.01)
    print(json.dumps({"alone": alone, "during": during, "during_stats": during_stats, "after": after,
                      "after_stats": meter.stats()}))  # type: ignore[union-attr]


if __name__ == "__main__":
    main()
    sys.stdout.flush()
