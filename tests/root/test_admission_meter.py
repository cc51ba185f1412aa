"""The kernel-fed per-request cost: what the BPF programs charge to each thread of a process
in a watched cgroup, read without a syscall."""

from __future__ import annotations

import pytest
from support.cgroups import MiB, make_cgroup, needs_bpf, needs_cgroups

pytestmark = [pytest.mark.root, needs_bpf, needs_cgroups]

CHILD = """
import asyncio, json, mmap, os, sys, threading
from rtml_ebpf import Admission, Limiter
os.environ["RTML_LEDGER_DIR"] = sys.argv[1]
MiB = 1 << 20
lim = Limiter(backend="ebpf", metric="usage", relief=False)
adm = Admission(lim, request_bytes=MiB)
meter = lim.thread_meter()
out = {"source": meter.source, "threads": {}, "async": {}}

def request(n_mib, key):
    t = adm.try_admit(f"GET /{key}")
    bufs = [mmap.mmap(-1, MiB) for _ in range(n_mib)]
    for b in bufs:
        b[::4096] = b"\\x01" * (MiB // 4096)
    for b in bufs:
        b.close()  # freed before the end: the cost is the peak, not what is left
    out["threads"][key] = [n_mib * MiB, adm.finish(t)]

threads = [threading.Thread(target=request, args=(n, f"t{n}")) for n in (4, 16, 40)]
for th in threads: th.start()
for th in threads: th.join()

async def handler(n_mib, held):
    for _ in range(n_mib):
        b = mmap.mmap(-1, MiB); b[::4096] = b"\\x01" * (MiB // 4096); held.append(b)
        await asyncio.sleep(0)

async def main():
    tickets = {n: adm.try_admit(f"GET /a{n}", stepped=True) for n in (6, 30)}
    held = {n: [] for n in tickets}
    await asyncio.gather(*(adm.run_async(t, handler(n, held[n])) for n, t in tickets.items()))
    for n, t in tickets.items():
        out["async"][str(n)] = [n * MiB, adm.finish(t)]

asyncio.run(main())
print(json.dumps(out))
"""


def test_each_thread_and_each_async_request_is_charged_its_own_memory(tmp_path: object) -> None:
    with make_cgroup(limit=256 * MiB) as cg:
        out = cg.run_python(["-c", CHILD, str(tmp_path)])
    assert out["source"] == "ebpf"
    for key, (allocated, measured) in {**out["threads"], **out["async"]}.items():
        assert measured is not None, key
        assert abs(measured - allocated) <= 0.1 * allocated, (key, measured, allocated)
