"""Run inside a small memory cgroup by tests/root/test_enforcer_wake.py: this process loads its
own programs (backend="ebpf"), admits three well-behaved requests and one that overruns its
reservation at ~500 MiB/s, with the enforcer's backstop look made longer than the whole run, so
only the kernel's wake can end the overrun before the OOM killer ends the process. Prints one
JSON line: what happened, the wake's records, and the wake level once nothing is in flight.

    python wake_child.py wake|nowake
"""

from __future__ import annotations

import json
import sys
import threading
import time

from rtml_ebpf import Limiter
from rtml_ebpf.admission import Admission, enforce
from rtml_ebpf.ebpf import abi
from rtml_ebpf.ebpf.runtime import Runtime
from rtml_ebpf.errors import RequestMemoryExceeded

MiB = 1 << 20
LONG = 60.0  # longer than the run: a backstop look never comes


def main(mode: str) -> None:
    enforce.BACKSTOP = LONG
    if mode == "nowake":  # the control: no kernel wake and polls as rare as the backstop
        Runtime.waker = lambda self, cgroup_id, poll: None  # type: ignore[method-assign]
        enforce.FAR_INTERVAL = enforce.NEAR_INTERVAL = LONG
    lim = Limiter(threshold=0.8, metric="usage", backend="ebpf")
    adm = Admission(lim, route_costs={"GET /small": 8 * MiB, "POST /overrun": 8 * MiB}, share=False)
    assert adm.enforcer is not None
    outcomes: dict[str, str] = {}
    tids: dict[str, int] = {}
    go = threading.Event()

    def request(name: str, route: str, total: int, pause: float) -> None:
        ticket = adm.try_admit(route)
        if ticket is None:
            outcomes[name] = "shed"
            return
        tids[name] = threading.get_native_id()
        held = []
        try:
            go.wait(5)
            for _ in range(total):
                held.append(b"\x01" * MiB)  # touched: charged now
                time.sleep(pause)
            time.sleep(0.5)
            outcomes[name] = "completed"
        except RequestMemoryExceeded:
            outcomes[name] = "ended"
        finally:
            del held
            adm.finish(ticket)

    threads = [threading.Thread(target=request, args=(f"small{i}", "GET /small", 8, 0.01)) for i in range(3)]
    threads.append(threading.Thread(target=request, args=("overrun", "POST /overrun", 600, 0.002)))
    for t in threads:
        t.start()
    time.sleep(0.2)  # every request admitted, the enforcer's first look done: the level is set
    rt = Runtime.current()
    assert rt is not None
    slot = rt.slot_of(lim.cgroup_id)
    assert slot is not None
    words = memoryview(rt._loaded.maps["configs"]).cast("q")  # noqa: SLF001 - the level as the programs read it
    level_in_flight = int(words[slot * abi.CONFIG_WORDS + abi.C_WAKE])
    go.set()
    for t in threads:
        t.join(30)
    time.sleep(enforce.IDLE_SLICE * 4)  # the enforcer notices nothing is in flight
    level_idle = int(words[slot * abi.CONFIG_WORDS + abi.C_WAKE])
    s = rt.read_slot(slot)
    print(json.dumps({"outcomes": outcomes, "tids": tids, "woken": adm.enforcer.woken,
                      "wake_tids": adm.enforcer.wake_tids, "ended_total": adm.enforcer.ended_total,
                      "level_in_flight": level_in_flight, "level_idle": level_idle, "wakes": int(s.wakes),
                      "wakes_lost": int(s.wakes_lost), "limit_pages": int(s.limit_pages)}))


if __name__ == "__main__":
    main(sys.argv[1])
