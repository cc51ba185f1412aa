"""A client of the node agent, run by the tests as uid 65534 inside a limited cgroup.

    python agent_client.py flip THRESHOLD        grow 1 MiB at a time until the verdict trips
    python agent_client.py attack                try to write the page, widen the lease, ask for others
    python agent_client.py hold MIB SECONDS [until_back]   hold MIB, check in a loop, report the answers
    python agent_client.py churn SECONDS RATE    connect, watch, close, RATE times a second
    python agent_client.py hotloop N             N checks between two marker syscalls (for strace)
    python agent_client.py limiters N            build and close N agent Limiters: nothing may leak
    python agent_client.py scope DIR             a Limiter on DIR (an ancestor: the pod) through the agent

Prints one JSON line. Only the standard library and rtml_ebpf: no bpf() call anywhere.
"""

from __future__ import annotations

import ctypes
import json
import mmap
import os
import socket
import sys
import time

from rtml_ebpf import Limiter
from rtml_ebpf.backends.agent import socket_path
from rtml_ebpf.backends.agent_maps import _address

MiB = 1 << 20


def touch(n: int) -> bytearray:
    buf = bytearray(n)
    for i in range(0, n, 4096):
        buf[i] = 1
    return buf


def flip(threshold: float) -> dict:
    lim = Limiter(backend="agent", threshold=threshold, metric="usage", relief=False)
    held = []
    while not lim.is_mem_limit_reached() and len(held) < 4096:
        held.append(touch(MiB))
        time.sleep(0.002)
    s = lim.stats()
    return {"backend": s.backend, "reason": s.backend_reason, "tripped": s.tripped, "held_mib": len(held),
            "usage": s.usage_bytes, "limit": s.limit_bytes, "threshold": s.threshold_bytes,
            "cgroup_id": s.cgroup_id, "growth": bool(lim._backend.snapshot(lim._handle).growth)}


def request(message: dict) -> tuple[dict, list[int], socket.socket]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.settimeout(3)
    sock.connect(socket_path())
    sock.send(json.dumps(message).encode())
    data, anc, _, _ = sock.recvmsg(4096, socket.CMSG_SPACE(8))
    fds = []
    for _, _, payload in anc:
        fds.extend(int.from_bytes(payload[i:i + 4], "little") for i in range(0, len(payload) - 3, 4))
    return (json.loads(data) if data else {"ok": False, "error": "closed"}), fds, sock


RULE = {"metric": "usage", "trip_ppm": 900000, "clear_ppm": 880000}


def attack() -> dict:
    out: dict[str, object] = {"uid": os.getuid()}
    reply, fds, sock = request({"v": 1, "op": "watch", "rules": [RULE]})
    out["own_cgroup_id"] = reply.get("cgroup_id")
    page_fd, beat_fd = fds
    for name, fd in (("page", page_fd), ("beat", beat_fd)):
        try:
            mmap.mmap(fd, 4096, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            out[f"{name}_writable_map"] = "ALLOWED"
        except OSError as exc:
            out[f"{name}_writable_map"] = exc.errno
    ro = mmap.mmap(page_fd, 4096, mmap.MAP_SHARED, mmap.PROT_READ)
    libc = ctypes.CDLL(None, use_errno=True)
    # mprotect to writable: the kernel refuses (VM_MAYWRITE was never granted)
    view = memoryview(ro)
    addr = _address(view)  # the client library's helper: ctypes refuses read-only buffers
    rc = libc.mprotect(ctypes.c_void_p(addr), 4096, 3)
    out["mprotect_writable"] = "ALLOWED" if rc == 0 else ctypes.get_errno()
    # bpf(BPF_MAP_UPDATE_ELEM) on the page: refused (no bpf() for us, and the map is frozen)
    key = ctypes.c_uint32(0)
    value = (ctypes.c_ubyte * 256)(*([1] * 256))
    attr = (ctypes.c_uint64 * 4)(page_fd, ctypes.addressof(key), ctypes.addressof(value), 0)
    rc = libc.syscall(321, 2, ctypes.byref(attr), 32)
    out["bpf_update"] = "ALLOWED" if rc == 0 else ctypes.get_errno()
    view.release()
    ro.close()
    for fd in fds:
        os.close(fd)
    sock.close()
    refusals = {}
    for name, msg in (("other_cgroup", {"v": 1, "op": "watch", "rules": [RULE], "cgroup": "/"}),
                      ("other_pid", {"v": 1, "op": "watch", "rules": [RULE], "pid": 1}),
                      ("pod_scope_outside_pod", {"v": 1, "op": "watch", "rules": [RULE], "scope": "pod"}),
                      ("bad_rule", {"v": 1, "op": "watch", "rules": [{"metric": "usage", "trip_ppm": -5}]}),
                      ("stats_first", {"v": 1, "op": "stats"})):
        reply, fds, sock = request(msg)
        for fd in fds:
            os.close(fd)
        sock.close()
        refusals[name] = reply
    out["refusals"] = refusals
    return out


def hold(mib: int, seconds: float, until_back: bool = False) -> dict:
    """Check in a loop for ``seconds``; ``until_back``: stop early once the Limiter went to
    polling and came back to the agent."""
    lim = Limiter(backend="agent", threshold=0.5, metric="usage", relief=False, hysteresis=0.02)
    kept = touch(mib * MiB) if mib else bytearray()
    answers = {}  # (backend, answer) -> count
    switches = []
    last = None
    print(json.dumps({"ready": time.time()}), flush=True)  # the test acts after this line
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        key = f"{lim.backend}:{lim.is_mem_limit_reached()}"
        answers[key] = answers.get(key, 0) + 1
        if key != last:
            switches.append([time.time(), key])  # wall clock: the test compares with its own events
            last = key
            if until_back and key.startswith("agent:") and any(k.startswith("poll:") for _, k in switches):
                break
        time.sleep(0.001)
    del kept
    return {"answers": answers, "switches": switches, "reason": lim.stats().backend_reason}


def churn(seconds: float, rate: float) -> dict:
    ok = errors = 0
    first_error = ""
    end = time.monotonic() + seconds
    period = 1.0 / rate
    nxt = time.monotonic()
    while time.monotonic() < end:
        try:
            reply, fds, sock = request({"v": 1, "op": "watch", "rules": [RULE]})
            for fd in fds:
                os.close(fd)
            sock.close()
            ok += bool(reply.get("ok"))
            errors += not reply.get("ok")
            if not reply.get("ok") and not first_error:
                first_error = str(reply.get("error"))
        except OSError as exc:
            errors += 1
            first_error = first_error or repr(exc)
        nxt += period
        time.sleep(max(0.0, nxt - time.monotonic()))
    return {"ok": ok, "errors": errors, "first_error": first_error}


def scope(directory: str) -> dict:
    """A Limiter on an ancestor of this process's cgroup (its pod), through the agent."""
    try:
        lim = Limiter(directory, backend="agent", relief=False)
    except Exception as exc:  # noqa: BLE001 - the refusal is the result
        return {"error": str(exc)}
    s = lim.stats()
    return {"backend": s.backend, "cgroup_dir": s.cgroup_dir, "cgroup_id": s.cgroup_id, "limit": s.limit_bytes}


def limiters(n: int) -> dict:
    """Build and close n agent Limiters (a kept check from each, dropped later): mappings,
    fds and RSS must come back (a retired page is unmapped once its last view goes)."""
    import gc

    def counts() -> tuple[int, int, int]:
        with open("/proc/self/maps") as f:
            maps = sum(1 for _ in f)
        with open("/proc/self/status") as f:
            rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
        return maps, len(os.listdir("/proc/self/fd")), rss

    def once() -> bool:
        lim = Limiter(backend="agent", threshold=0.9, relief=False)
        kept = lim.is_mem_limit_reached
        lim.close()
        return bool(kept())  # the fail answer (False), read from the retired page

    for _ in range(50):
        once()
    gc.collect()
    before = counts()
    answers = {once() for _ in range(n)}
    gc.collect()
    after = counts()
    return {"before": before, "after": after, "answers": sorted(answers)}


def hotloop(n: int) -> dict:
    lim = Limiter(backend="agent", threshold=0.9, relief=False)
    check = lim.is_mem_limit_reached
    # The monitor thread (it watches the agent's beat) would take the GIL during a slow loop
    # (the vmtest VM): its futex calls are the interpreter's thread switches, not the check's.
    sys.setswitchinterval(100)
    os.getppid()  # marker: the loop starts after this syscall
    for _ in range(n):
        check()
    os.getppid()  # marker: the loop ended
    return {"backend": lim.backend}


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "flip":
        result = flip(float(sys.argv[2]))
    elif mode == "attack":
        result = attack()
    elif mode == "hold":
        result = hold(int(sys.argv[2]), float(sys.argv[3]), len(sys.argv) > 4 and sys.argv[4] == "until_back")
    elif mode == "limiters":
        result = limiters(int(sys.argv[2]))
    elif mode == "scope":
        result = scope(sys.argv[2])
    elif mode == "churn":
        result = churn(float(sys.argv[2]), float(sys.argv[3]))
    else:
        result = hotloop(int(sys.argv[2]))
    print(json.dumps(result), flush=True)
