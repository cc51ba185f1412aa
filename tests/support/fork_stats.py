"""A Limiter on the node agent, then pre-fork workers: the parent and each worker ask for the
agent's counters (the round trip of ``Limiter.stats()``) at the same instants, in a loop. Run by
tests/root/test_agent_fork_stats.py as uid 65534 inside a test cgroup; prints one JSON line.

``--lease``: the workers ask on the inherited lease, as before the fix (to show the test fails);
``--wake``: the enforcer's wake connection made before a fork, in the child and the parent."""

from __future__ import annotations

import json
import os
import sys
import time

from rtml_ebpf import Limiter

WORKERS = 3
TICKS = 20
TICK = 0.25  # 4 processes x 4 asks a second: under the agent's 20 requests a second per connection


def ask_loop(lim: Limiter, start: float) -> dict[str, object]:
    backend, handle = lim._backend, lim._handle  # type: ignore[attr-defined]
    missing, slowest, events = 0, 0.0, []
    for i in range(TICKS):
        time.sleep(max(0.0, start + i * TICK - time.monotonic()))  # all processes at once
        t0 = time.monotonic()
        snap = backend.snapshot(handle)  # what Limiter.stats() asks: the counters by a round trip
        slowest = max(slowest, time.monotonic() - t0)
        if snap.events is None:
            missing += 1
        else:
            events.append(snap.events)
        lim.stats()  # the public call, on the same path (its counters are not in Stats)
    return {"pid": os.getpid(), "missing": missing, "slowest": slowest,
            "monotonic": events == sorted(events), "lost": backend.lost}


def wake_after_fork(lim: Limiter) -> None:
    """The enforcer's wake made before a fork: the child's copy of its connection is closed (its
    use fails, as for a connection the agent closed) and the child gets a wake of its own; the
    parent's goes on working."""
    from rtml_ebpf.errors import AgentUnavailable

    waker = lim.waker(0.05)
    assert waker is not None and waker.sock is not None
    waker.set_margin(64 << 20)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        out: dict[str, object] = {"inherited_open": waker.sock.fileno() >= 0}
        try:
            waker.wait(0.05)
            out["inherited_use"] = "worked"
        except AgentUnavailable as exc:
            out["inherited_use"] = f"failed: {exc}"
        own = lim.waker(0.05)
        out["own_open"] = own is not None and own.sock is not None and own.sock.fileno() >= 0
        if own is not None:
            own.set_margin(32 << 20)
            out["own_wait"] = own.wait(0.05)
        os.write(w, json.dumps(out).encode())
        os._exit(0)
    os.close(w)
    child = json.loads(os.read(r, 65536) or b"{}")
    os.waitpid(pid, 0)
    waker.set_margin(48 << 20)
    parent = {"open": waker.sock is not None and waker.sock.fileno() >= 0, "wait": waker.wait(0.05)}
    print(json.dumps({"child": child, "parent": parent}))


def main() -> None:
    lim = Limiter(backend="agent", threshold=0.9, metric="usage", relief=False)
    assert lim.stats().backend == "agent"
    if "--wake" in sys.argv:
        wake_after_fork(lim)
        return
    if "--lease" in sys.argv:  # the code before the fix: a worker's round trip on its parent's lease
        from rtml_ebpf.backends.agent import AgentBackend

        AgentBackend._round_trip = lambda self, lease: (lease.sock, self._sock_lock)  # type: ignore[method-assign]
    start = time.monotonic() + 0.5
    pipes = []
    for _ in range(WORKERS):
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            try:
                out = ask_loop(lim, start)
            except BaseException as exc:  # noqa: BLE001 - reported to the parent
                out = {"pid": os.getpid(), "error": repr(exc)}
            os.write(w, json.dumps(out).encode())
            os._exit(0)
        os.close(w)
        pipes.append((pid, r))
    parent = ask_loop(lim, start)
    workers = []
    for pid, r in pipes:
        workers.append(json.loads(os.read(r, 65536) or b"{}"))
        os.waitpid(pid, 0)
    lease = lim._backend._leases[0]  # type: ignore[attr-defined]
    print(json.dumps({"parent": parent, "workers": workers, "lease_open": lease.sock is not None,
                      "after": lim._backend.snapshot(lim._handle).events is not None}))  # type: ignore[attr-defined]


if __name__ == "__main__":
    main()
    sys.stdout.flush()
