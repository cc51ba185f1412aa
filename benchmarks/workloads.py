"""Allocation workloads run inside a memory cgroup by the tests and the benchmarks (not shipped).

``python benchmarks/workloads.py alloc --step-kib 1024 --max-mib 400 ...`` grows
its resident memory in steps, asks a Limiter after each step, stops when the
limiter trips and prints one JSON object: how far it got, what the kernel
said the usage was at the flip, and the overshoot past the threshold.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import sys
import threading
import time
from typing import Any


def touch(buf: mmap.mmap, page: int = 4096, fast: bool = False) -> None:
    """Fault in every page (a write per page, like a payload being decoded)."""
    if fast:  # one C-level strided write: the fastest a Python process faults pages in
        buf[::page] = b"\x01" * ((len(buf) + page - 1) // page)
        return
    for off in range(0, len(buf), page):
        buf[off] = 1


def usage_file(cgroup_dir: str) -> str:
    v2 = os.path.join(cgroup_dir, "memory.current")
    return v2 if os.path.exists(v2) else os.path.join(cgroup_dir, "memory.usage_in_bytes")


def read_int(path: str) -> int:
    with open(path) as f:
        return int(f.read())


def alloc_until_tripped(
    *, step: int, max_bytes: int, threshold: int, metric: str, backend: str, poll_interval: float | None,
    fast: bool = False, contend: bool = False,
) -> dict[str, Any]:
    from rtml_ebpf import Limiter

    kwargs: dict[str, Any] = {"threshold": threshold, "metric": metric, "backend": backend}
    if poll_interval is not None:
        kwargs["poll_interval"] = poll_interval
    lim = Limiter(**kwargs)
    ufile = usage_file(lim.cgroup.directory)
    done = threading.Event()
    if contend:  # another thread asking all the time, as request handlers of a service do
        threading.Thread(target=lambda: [lim.level() for _ in iter(done.is_set, True)], daemon=True).start()
    held: list[mmap.mmap] = []
    allocated = 0
    crossed_at: int | None = None  # kernel usage at the first step that crossed the threshold
    result: dict[str, Any] = {"backend": lim.backend, "hooks": list(lim.stats().hooks), "threshold": threshold}
    tripped = lim.is_mem_limit_reached()
    t0 = time.perf_counter()
    while not tripped and allocated < max_bytes:
        buf = mmap.mmap(-1, step)
        touch(buf, fast=fast)
        held.append(buf)
        allocated += step
        tripped = lim.is_mem_limit_reached()  # the check under test, right after the step
        usage = read_int(ufile)  # measurement only, after the check
        if crossed_at is None and usage >= threshold:
            crossed_at = usage
        if tripped:
            result["usage_at_flip"] = usage
    done.set()
    result.update(
        tripped=tripped,
        allocated=allocated,
        seconds=time.perf_counter() - t0,
        usage_at_cross=crossed_at,
        overshoot=(max(0, result["usage_at_flip"] - threshold) if tripped else None),
        stats=lim.stats().as_dict(),
    )
    lim.close()
    return result


def hold() -> int:
    """A steerable hog for tests: memory grows and shrinks on command, each change acknowledged."""
    held: list[mmap.mmap] = []
    print(json.dumps({"held_mib": 0}), flush=True)
    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        n = int(line)
        if n > 0:
            for _ in range(n):
                b = mmap.mmap(-1, 1 << 20)
                touch(b, fast=True)
                held.append(b)
        else:
            for _ in range(min(-n, len(held))):
                held.pop().close()
        print(json.dumps({"held_mib": len(held)}), flush=True)
    return 0


def grow(rate: int, seconds: float, cap: int) -> int:
    """Allocate at ``rate`` bytes/s (1 MiB steps, pages touched) for ``seconds`` or until ``cap``
    bytes; say "go" and "done" on stdout, then hold it all until killed."""
    held: list[mmap.mmap] = []
    step = 1 << 20
    t0 = time.monotonic()
    print("go", flush=True)
    while time.monotonic() - t0 < seconds and len(held) * step < cap:
        due = min(int(rate * (time.monotonic() - t0) / step), cap // step)
        while len(held) < due:
            b = mmap.mmap(-1, step)
            touch(b, fast=True)
            held.append(b)
        time.sleep(0.005)
    print("done", flush=True)
    time.sleep(60)
    return 0


def request_costs(ledger_dir: str, backend: str = "ebpf") -> dict[str, Any]:
    """Requests of known sizes through Admission on this process's cgroup: concurrent threads
    and interleaved asyncio requests. Per request: [bytes allocated, cost measured]."""
    import asyncio

    from rtml_ebpf import Admission, Limiter

    os.environ["RTML_LEDGER_DIR"] = ledger_dir
    mib = 1 << 20
    lim = Limiter(backend=backend, metric="usage", relief=False)
    adm = Admission(lim, request_bytes=mib)
    meter = lim.thread_meter()
    out: dict[str, Any] = {"source": meter.source if meter else None, "threads": {}, "async": {}}

    def request(n_mib: int, key: str) -> None:
        t = adm.try_admit(f"GET /{key}")
        assert t is not None
        bufs = [mmap.mmap(-1, mib) for _ in range(n_mib)]
        for b in bufs:
            touch(b, fast=True)
        for b in bufs:
            b.close()  # freed before the end: the cost is the peak, not what is left
        out["threads"][key] = [n_mib * mib, adm.finish(t)]

    threads = [threading.Thread(target=request, args=(n, f"t{n}")) for n in (2, 4, 16, 40, 64)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()

    async def handler(n_mib: int, held: list[mmap.mmap]) -> None:
        for _ in range(n_mib):
            b = mmap.mmap(-1, mib)
            touch(b, fast=True)
            held.append(b)
            await asyncio.sleep(0)  # interleave with the other request on the same thread

    async def both() -> None:
        tickets = {n: adm.try_admit(f"GET /a{n}", stepped=True) for n in (6, 30)}
        held: dict[int, list[mmap.mmap]] = {n: [] for n in tickets}
        await asyncio.gather(*(adm.run_async(t, handler(n, held[n])) for n, t in tickets.items()  # type: ignore[arg-type]
                               if t is not None))
        for n, t in tickets.items():
            assert t is not None
            out["async"][f"a{n}"] = [n * mib, adm.finish(t)]

    asyncio.run(both())
    stats = getattr(meter, "stats", None)
    out["meter_stats"] = stats() if stats is not None else None  # the agent's client meter says how many it metered
    lim.close()
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="benchmarks/workloads.py")
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("alloc")
    a.add_argument("--step-kib", type=int, default=1024)
    a.add_argument("--max-mib", type=int, default=512)
    a.add_argument("--threshold", type=int, required=True, help="bytes")
    a.add_argument("--metric", default="usage")
    a.add_argument("--backend", default="ebpf")
    a.add_argument("--poll-interval", type=float, default=None)
    a.add_argument("--fast", action="store_true", help="touch pages with one strided write per step")
    a.add_argument("--contend", action="store_true", help="a second thread checks the limiter in a loop")
    h = sub.add_parser("hog", help="allocate and hold memory until killed (to provoke an OOM kill)")
    h.add_argument("--mib", type=int, required=True)
    sub.add_parser("hold", help="read '+N' / '-N' lines on stdin: grow or shrink by N MiB; answer each")
    g = sub.add_parser("grow", help="allocate at a known rate, then hold (prints go / done)")
    g.add_argument("--rate", type=int, required=True, help="bytes per second")
    g.add_argument("--seconds", type=float, default=3600.0)
    g.add_argument("--cap", type=int, default=1 << 62, help="stop at this many bytes")
    c = sub.add_parser("cost", help="requests of known sizes through Admission: allocated vs measured cost")
    c.add_argument("ledger_dir")
    c.add_argument("--backend", default="ebpf", help="ebpf (own load) or agent (through the node agent)")
    args = p.parse_args(argv)
    if args.cmd == "hold":
        return hold()
    if args.cmd == "grow":
        return grow(args.rate, args.seconds, args.cap)
    if args.cmd == "cost":
        print(json.dumps(request_costs(args.ledger_dir, args.backend)))
        return 0
    if args.cmd == "alloc":
        out = alloc_until_tripped(
            step=args.step_kib * 1024, max_bytes=args.max_mib << 20, threshold=args.threshold,
            metric=args.metric, backend=args.backend, poll_interval=args.poll_interval, fast=args.fast,
            contend=args.contend,
        )
        print(json.dumps(out))
        return 0
    bufs = []
    for _ in range(args.mib):
        b = mmap.mmap(-1, 1 << 20)
        touch(b)
        bufs.append(b)
    print(json.dumps({"held_mib": args.mib}), flush=True)
    time.sleep(30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
