"""A thread registers with the eBPF thread meter, then forks: the child must meter itself, not
read the parent's entry, and must leave the parent's registration alone. Run by
tests/root/test_admission_meter.py inside a limited cgroup; prints one JSON line."""

from __future__ import annotations

import json
import os
import sys

from rtml_ebpf import Limiter

MiB = 1 << 20


def touch(n: int) -> bytearray:
    buf = bytearray(n)
    for i in range(0, n, 4096):
        buf[i] = 1
    return buf


def main() -> None:
    lim = Limiter(backend="ebpf", threshold=0.9, metric="usage", relief=False)
    meter = lim.thread_meter()
    assert meter is not None and meter.source == "ebpf", meter
    meter.begin()  # this thread registers
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        net0 = meter.begin()
        buf = touch(32 * MiB)
        net1, peak1 = meter.read()
        del buf
        os.write(w, json.dumps({"grew": net1 - net0, "peak": peak1 - net0}).encode())
        os._exit(0)
    os.close(w)
    child = json.loads(os.read(r, 4096))
    os.waitpid(pid, 0)
    net0 = meter.begin()  # the parent's entry: still registered after the child came and went
    buf = touch(16 * MiB)
    net1, _ = meter.read()
    del buf
    print(json.dumps({"child": child, "parent_grew": net1 - net0}))


if __name__ == "__main__":
    main()
    sys.stdout.flush()
