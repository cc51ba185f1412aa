"""Run inside a small memory cgroup by tests/root/test_enforcer_wake.py: this process loads its
own programs (backend="ebpf"), admits three well-behaved requests and one that overruns its
reservation at ~500 MiB/s, with the enforcer's backstop look made longer than the whole run, so
only the kernel's wake can end the overrun before the OOM killer ends the process. Prints one
JSON line: what happened, the wake's records, and the wake level once nothing is in flight.

    python wake_child.py wake|nowake|agent

``agent``: the Limiter is a client of the node's shared load (the environment names a private
place, tests/support/shared.py), whose agent consumes the ring and forwards this cgroup's
records on a wake connection (rtml_ebpf/backends/agent_wake.py); the level is read from the
agent's pinned ``configs`` map.
"""

from __future__ import annotations

import ctypes
import json
import mmap
import os
import sys
import threading
import time
from collections.abc import Callable

from rtml_ebpf import Limiter
from rtml_ebpf.admission import Admission, enforce
from rtml_ebpf.ebpf import abi
from rtml_ebpf.ebpf.runtime import Runtime
from rtml_ebpf.errors import RequestMemoryExceeded

MiB = 1 << 20
LONG = 60.0  # longer than the run: a backstop look never comes


def own_level(lim: Limiter) -> Callable[[], int]:
    """The wake level of this process's own load, as its programs read it."""
    rt = Runtime.current()
    assert rt is not None
    slot = rt.slot_of(lim.cgroup_id)
    assert slot is not None
    words = memoryview(rt._loaded.maps["configs"]).cast("q")  # noqa: SLF001 - the level the programs read
    return lambda: int(words[slot * abi.CONFIG_WORDS + abi.C_WAKE])


def agent_level(lim: Limiter) -> Callable[[], int]:
    """The wake level the shared agent wrote for this cgroup, from its pinned maps (root)."""
    from rtml_ebpf.backends.shared import pin_dir
    from rtml_ebpf.ebpf import libbpf
    from rtml_ebpf.ebpf.loader import map_len

    fds = {n: libbpf.lib().bpf_obj_get(os.path.join(pin_dir(), "maps", n).encode()) for n in ("slots", "configs")}
    assert min(fds.values()) >= 0, fds
    entries = libbpf.map_info(fds["slots"])[4]
    slots = mmap.mmap(fds["slots"], map_len(ctypes.sizeof(abi.Slot), entries), mmap.MAP_SHARED, mmap.PROT_READ)
    cfgs = mmap.mmap(fds["configs"], map_len(ctypes.sizeof(abi.Config), entries), mmap.MAP_SHARED, mmap.PROT_READ)
    sw, cw = memoryview(slots).cast("q"), memoryview(cfgs).cast("q")
    slot = next(i for i in range(entries) if sw[i * abi.SLOT_WORDS + abi.Slot.cgroup_id.offset // 8] == lim.cgroup_id)
    return lambda: int(cw[slot * abi.CONFIG_WORDS + abi.C_WAKE])


def main(mode: str) -> None:
    enforce.BACKSTOP = LONG
    if mode == "nowake":  # the control: no kernel wake and polls as rare as the backstop
        Runtime.waker = lambda self, cgroup_id, poll: None  # type: ignore[method-assign]
        enforce.FAR_INTERVAL = enforce.NEAR_INTERVAL = LONG
    lim = Limiter(threshold=0.8, metric="usage", backend="auto" if mode == "agent" else "ebpf")
    if mode == "agent" and not hasattr(Limiter, "waker"):
        # Until Limiter.waker(poll) hands out its backend's: the agent client's wake for its rule.
        from rtml_ebpf.backends.agent_wake import waker_of

        b, h = lim._backend, lim._handle  # noqa: SLF001
        lim.waker = lambda poll: waker_of(b, h, poll)  # type: ignore[attr-defined]
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
    level = agent_level(lim) if mode == "agent" else own_level(lim)
    level_in_flight = level()
    waker = type(adm.enforcer._waker).__name__  # noqa: SLF001 - which wake the enforcer got
    go.set()
    for t in threads:
        t.join(30)
    time.sleep(enforce.IDLE_SLICE * 4)  # the enforcer notices nothing is in flight
    print(json.dumps({"outcomes": outcomes, "tids": tids, "woken": adm.enforcer.woken,
                      "wake_tids": adm.enforcer.wake_tids, "ended_total": adm.enforcer.ended_total,
                      "level_in_flight": level_in_flight, "level_idle": level(), "waker": waker,
                      "limit_bytes": lim.stats().limit_bytes, "backend": lim.stats().backend}))


if __name__ == "__main__":
    main(sys.argv[1])
