"""A client of the node agent's thread meter, run by the tests as uid 65534 inside a limited cgroup.

    python meter_client.py measure MIB         a thread allocates MIB (touched), frees it; the meter's readings
    python meter_client.py attack OTHER_TID    ask for another process's thread, write the meter page, ...
    python meter_client.py hold SECONDS        register two threads, then hold the connection SECONDS
    python meter_client.py cap N               N parked threads registered on one connection (paced)
    python meter_client.py restart MIB         measure; wait for a stdin line (the agent restarted); measure again
    python meter_client.py restart MIB forked  the same in a forked worker (the parent built the Limiter)
    python meter_client.py relay               send each stdin line (hex) on a watching connection, print replies
    python meter_client.py fork MIB            fork 2 workers (one forks again); a thread of each and of the parent
                                               measures MIB; a stdin line lets them exit; the parent measures again
    python meter_client.py crowd MIB           fill the cgroup's 256 agent connections, then fork a worker that
                                               measures MIB (refused a connection: getrusage, saying why)

Prints one JSON line. Only the standard library and rtml_ebpf: no bpf() call anywhere.
"""

from __future__ import annotations

import ctypes
import json
import mmap
import os
import socket
import sys
import threading
import time

from rtml_ebpf import Limiter
from rtml_ebpf.backends.agent_maps import _address

MiB = 1 << 20
RULE = {"metric": "usage", "trip_ppm": 900000, "clear_ppm": 880000}


class Touched(list):  # type: ignore[type-arg]
    """n bytes allocated and touched in 1 MiB pieces, freed with the object."""


def touch(n: int) -> Touched:
    # In 1 MiB pieces, as a request's objects are: on kernels without the memcg tracepoints
    # (before 6.13) the kernel meter counts page faults, and one large allocation is faulted in
    # transparent huge pages where THP is "always", each counted as one page (docs/admission.md,
    # the meter sources). The memcg tracepoints see every charge at its size.
    # Mappings of their own, so that a free returns the memory at once (malloc would keep
    # freed pieces for the next allocation, charged).
    out = Touched()
    for _ in range(max(1, n // MiB)):
        buf = mmap.mmap(-1, min(n, MiB))
        for i in range(0, len(buf), 4096):
            buf[i] = 1
        out.append(buf)
    return out


def measure(mib: int) -> dict:
    lim = Limiter(backend="agent", threshold=0.9, metric="usage", relief=False)
    meter = lim.thread_meter()
    out: dict[str, object] = {"backend": lim.backend, "uid": os.getuid(),
                              "source": getattr(meter, "source", None), "hooks": list(lim.stats().hooks)}

    def work(name: str, n: int) -> None:
        assert meter is not None
        net0 = meter.begin()
        buf = touch(n * MiB)
        net1, peak1 = meter.read()
        del buf
        net2, peak2 = meter.read()
        meter.reset_peak()
        small = touch(MiB)
        net3, peak3 = meter.read()
        del small
        out[name] = {"grew": net1 - net0, "peak": peak1 - net0, "freed_net": net2 - net0, "kept_peak": peak2 - net0,
                     "after_reset_peak": peak3 - net2, "net_of": meter.net_of(threading.get_native_id()) is not None}

    work("main", mib)
    t = threading.Thread(target=work, args=("thread", mib // 2))
    t.start()
    t.join()
    # a second Limiter of the process shares the meter (the agent keeps one entry per thread)
    lim2 = Limiter(backend="agent", threshold=0.8, metric="usage", relief=False)
    out["shared"] = lim2.thread_meter() is meter
    lim2.close()
    # a forked child asks on a connection of its own: its parent's would name the parent
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        child = meter.begin(), meter.read()  # type: ignore[union-attr]
        live = meter._live()  # type: ignore[union-attr]
        parent_socks = {lease.sock for lease in lim._backend._leases}  # type: ignore[attr-defined]
        os.write(w, json.dumps({"live": live is not None, "own": live is not None and live[0] not in parent_socks,
                                "read": child, "stats": meter.stats()}).encode())  # type: ignore[union-attr]
        os._exit(0)
    os.close(w)
    os.waitpid(pid, 0)
    with os.fdopen(r) as f:
        out["child"] = json.loads(f.read())
    work("after_fork", mib)
    out["stats_source"] = lim.stats().meter_source if hasattr(lim.stats(), "meter_source") else None
    out["meter_stats"] = meter.stats() if hasattr(meter, "stats") else None  # type: ignore[union-attr]
    lim.close()
    return out


def _request(sock: socket.socket, message: dict) -> tuple[dict, list[int]]:
    sock.send(json.dumps(message).encode())
    data, anc, _, _ = sock.recvmsg(4096, socket.CMSG_SPACE(8))
    fds: list[int] = []
    for _, _, payload in anc:
        fds.extend(int.from_bytes(payload[i:i + 4], "little") for i in range(0, len(payload) - 3, 4))
    return (json.loads(data) if data else {"ok": False, "error": "closed"}), fds


def _watch() -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.settimeout(3)
    sock.connect(os.environ["RTML_AGENT_SOCKET"])
    reply, fds = _request(sock, {"v": 1, "op": "watch", "rules": [RULE]})
    assert reply.get("ok"), reply
    for fd in fds:
        os.close(fd)
    return sock


def attack(other_tid: int) -> dict:
    out: dict[str, object] = {"uid": os.getuid(), "own_tid": threading.get_native_id()}
    refusals = {}
    for name, msg in (("other_process", {"v": 1, "op": "meter", "tid": other_tid}),
                      ("no_such_thread", {"v": 1, "op": "meter", "tid": 4194303}),
                      ("with_pid", {"v": 1, "op": "meter", "tid": threading.get_native_id(), "pid": 1}),
                      ("bad_tid", {"v": 1, "op": "meter", "tid": -1}),
                      ("bool_tid", {"v": 1, "op": "meter", "tid": True})):
        sock = _watch()
        reply, fds = _request(sock, msg)
        for fd in fds:
            os.close(fd)
        sock.close()
        refusals[name] = reply
    out["refusals"] = refusals
    # meter before a watch: refused like every op of a new connection but watch/events
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.settimeout(3)
    sock.connect(os.environ["RTML_AGENT_SOCKET"])
    refusals["before_watch"], _ = _request(sock, {"v": 1, "op": "meter", "tid": threading.get_native_id()})
    sock.close()
    # our own thread: granted, with the two pages
    sock = _watch()
    reply, fds = _request(sock, {"v": 1, "op": "meter", "tid": threading.get_native_id()})
    out["own"] = reply
    out["fds"] = len(fds)
    page_fd, begin_fd = fds
    try:
        mmap.mmap(page_fd, 4096, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        out["page_writable_map"] = "ALLOWED"
    except OSError as exc:
        out["page_writable_map"] = exc.errno
    ro = mmap.mmap(page_fd, 4096, mmap.MAP_SHARED, mmap.PROT_READ)
    view = memoryview(ro)
    libc = ctypes.CDLL(None, use_errno=True)
    rc = libc.mprotect(ctypes.c_void_p(_address(view)), 4096, 3)
    out["mprotect_writable"] = "ALLOWED" if rc == 0 else ctypes.get_errno()
    key = ctypes.c_uint32(0)
    value = (ctypes.c_ubyte * 4096)(*([1] * 4096))
    attr = (ctypes.c_uint64 * 4)(page_fd, ctypes.addressof(key), ctypes.addressof(value), 0)
    rc = libc.syscall(321, 2, ctypes.byref(attr), 32)
    out["bpf_update"] = "ALLOWED" if rc == 0 else ctypes.get_errno()
    touch(8 * MiB)  # a charge, so our entry holds our tid
    words = view.cast("Q")
    out["page_tids"] = sorted({words[i * 4] & 0xFFFFFFFF for i in range(128)} - {0})
    out["begin_writable"] = True
    bm = mmap.mmap(begin_fd, 4096, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    bm[0:8] = (1).to_bytes(8, "little")  # ours to write: it only restarts our own peaks
    bm.close()
    words.release()
    view.release()
    ro.close()
    for fd in fds:
        os.close(fd)
    # a second ask on the same connection: no fds again
    reply, fds = _request(sock, {"v": 1, "op": "meter", "tid": threading.get_native_id()})
    out["again"] = {"ok": reply.get("ok"), "pages": reply.get("pages"), "fds": len(fds)}
    for fd in fds:
        os.close(fd)
    sock.close()
    return out


def hold(seconds: float) -> dict:
    lim = Limiter(backend="agent", threshold=0.9, metric="usage", relief=False)
    meter = lim.thread_meter()
    assert meter is not None
    meter.begin()
    t = threading.Thread(target=meter.begin)
    t.start()
    t.join()
    print(json.dumps({"registered": True, "source": meter.source}), flush=True)
    time.sleep(seconds)
    lim.close()
    return {"done": True}


def cap(n: int) -> dict:
    """Register ``n`` live threads on one watching connection, paced under the agent's 20
    requests a second: the replies past the per-connection cap, and whether the connection still
    serves (a stats request) after them."""
    stop = threading.Event()
    tids: list[int] = []
    ready = threading.Barrier(n + 1)

    def park() -> None:
        tids.append(threading.get_native_id())
        ready.wait()
        stop.wait(60)

    threads = [threading.Thread(target=park) for _ in range(n)]
    for t in threads:
        t.start()
    ready.wait()
    sock = _watch()
    granted, refusals = 0, []
    try:
        for tid in tids:
            reply, fds = _request(sock, {"v": 1, "op": "meter", "tid": tid})
            for fd in fds:
                os.close(fd)
            if reply.get("ok"):
                granted += 1
            else:
                refusals.append(reply)
            time.sleep(0.07)
        stats, _ = _request(sock, {"v": 1, "op": "stats"})
    finally:
        stop.set()
        for t in threads:
            t.join()
        sock.close()
    return {"granted": granted, "refusals": refusals, "stats_ok": stats.get("ok")}


def _one(meter: object, mib: int) -> int:
    net0 = meter.begin()  # type: ignore[attr-defined]
    buf = touch(mib * MiB)
    net1, _ = meter.read()  # type: ignore[attr-defined]
    del buf
    return int(net1 - net0)


def restart(mib: int, forked: bool = False) -> dict:
    """The agent restarts (adopting its pins) between two measurements: the lease reconnects,
    and the thread meter registers again on the new connection, from its new pages. ``forked``:
    the measuring process is a forked worker (its own connection closes: it opens another)."""
    lim = Limiter(backend="agent", threshold=0.9, metric="usage", relief=False)
    if forked and (pid := os.fork()) != 0:
        status = os.waitpid(pid, 0)[1]
        lim.close()
        return {"worker_status": status}
    meter = lim.thread_meter()
    assert meter is not None
    first = _one(meter, mib)
    print(json.dumps({"first": first, "stats": meter.stats()}), flush=True)  # type: ignore[attr-defined]
    sys.stdin.readline()
    deadline = time.monotonic() + 20
    again = 0
    while time.monotonic() < deadline:
        again = _one(meter, mib)
        if meter.stats()["registered"] >= 2:  # type: ignore[attr-defined]
            again = _one(meter, mib)  # a whole measurement on the new pages
            break
        time.sleep(0.2)
    out = {"first": first, "again": again, "stats": meter.stats(), "backend": lim.backend}  # type: ignore[attr-defined]
    if forked:
        print(json.dumps(out), flush=True)
        os._exit(0)
    lim.close()
    return out


def _in_thread(meter: object, mib: int) -> dict:
    """A thread of this process measures ``mib`` MiB: growth, peak, and the meter's stats then."""
    out: dict[str, object] = {}

    def work() -> None:
        net0 = meter.begin()  # type: ignore[attr-defined]
        buf = touch(mib * MiB)
        net1, peak1 = meter.read()  # type: ignore[attr-defined]
        del buf
        out.update(grew=net1 - net0, peak=peak1 - net0, tid=threading.get_native_id())

    t = threading.Thread(target=work)
    t.start()
    t.join()
    out["stats"] = meter.stats()  # type: ignore[attr-defined]
    out["pid"] = os.getpid()
    return out


def _worker(lim: Limiter, mib: int, report: int, release: int, grandchild: bool) -> None:
    """A pre-fork worker: measures in a thread, reports, waits for ``release`` to close."""
    meter = lim.thread_meter()
    out = _in_thread(meter, mib)
    out["same_meter"] = meter is lim.thread_meter()
    if grandchild:  # a child of a child: a connection of its own too, not its parent's
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            os.write(w, json.dumps(_in_thread(meter, mib)).encode())
            os._exit(0)
        os.close(w)
        with os.fdopen(r) as f:
            out["grandchild"] = json.loads(f.read())
        os.waitpid(pid, 0)
        lim2 = Limiter(backend="agent", threshold=0.8, metric="usage", relief=False)
        out["shared_in_child"] = lim2.thread_meter() is meter  # one meter per process, in a child too
        out["after_grandchild"] = _in_thread(meter, mib)
        lim2.close()
    os.write(report, (json.dumps(out) + "\n").encode())
    os.read(release, 1)  # b"": the parent closed it (or exited)


def fork(mib: int) -> dict:
    """A Limiter's process (a pre-fork master) forks 2 workers that measure with the kernel
    meter on connections of their own, measures on its lease, waits for a stdin line, lets them
    exit and measures again on its lease (no new connection: the agent kept it)."""
    lim = Limiter(backend="agent", threshold=0.9, metric="usage", relief=False)
    lease_sock = lim._backend._leases[0].sock  # type: ignore[attr-defined]
    out: dict[str, object] = {"backend": lim.backend, "uid": os.getuid()}
    # the workers are forked before anyone asked for the meter (as under gunicorn --preload):
    # each makes it from the backend it inherited, whose lease is still the master's
    report_r, report_w = os.pipe()
    release_r, release_w = os.pipe()
    pids = []
    for i in range(2):
        pid = os.fork()
        if pid == 0:
            os.close(report_r)
            os.close(release_w)
            try:
                _worker(lim, mib, report_w, release_r, grandchild=i == 0)
            finally:
                os._exit(0)
        pids.append(pid)
    os.close(report_w)
    os.close(release_r)
    meter = lim.thread_meter()
    out["before"] = _in_thread(meter, mib)  # the master measures on its lease meanwhile
    with os.fdopen(report_r) as f:
        out["workers"] = [json.loads(f.readline()) for _ in pids]
    print(json.dumps({"workers_ready": True}), flush=True)
    sys.stdin.readline()
    os.close(release_w)
    out["exits"] = [os.waitpid(pid, 0)[1] for pid in pids]
    out["after"] = _in_thread(meter, mib)  # a new thread: a new ask, on the parent's lease
    out["same_lease"] = lim._backend._leases[0].sock is lease_sock  # type: ignore[attr-defined]
    out["lease_open"] = lease_sock is not None and lease_sock.fileno() >= 0
    out["lease_stats"] = lim._backend._stats(lease_sock) is not None  # type: ignore[attr-defined]
    print(json.dumps({"parent_done": True}), flush=True)
    sys.stdin.readline()
    lim.close()
    return out


def crowd(mib: int) -> dict:
    """The agent's cap of connections per cgroup, reached: holders (forked, 32 connections per
    pid at most) take every connection the Limiter's lease left; a worker forked then cannot
    open its own and measures with getrusage, saying why; the master's lease still serves."""
    lim = Limiter(backend="agent", threshold=0.9, metric="usage", relief=False)
    meter = lim.thread_meter()
    ready_r, ready_w = os.pipe()
    release_r, release_w = os.pipe()
    holders, held = [], 32
    while held == 32:  # until one holder could not open all 32 of its connections: the cap
        pid = os.fork()
        if pid == 0:
            try:
                os.close(release_w)  # (else no holder would see it close: each would hold it)
                socks = []
                try:
                    while len(socks) < 32:
                        socks.append(_watch())
                except (AssertionError, OSError):
                    pass  # refused: the cgroup's connections are all taken
                os.write(ready_w, bytes([len(socks)]))
                os.read(release_r, 1)
            finally:
                os._exit(0)
        holders.append(pid)
        held = os.read(ready_r, 1)[0]
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        os.write(w, json.dumps(_in_thread(meter, mib)).encode())
        os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        worker = json.loads(f.read())
    os.waitpid(pid, 0)
    os.close(release_w)
    for pid in holders:
        os.waitpid(pid, 0)
    out = {"worker": worker, "parent": _in_thread(meter, mib), "holders": len(holders), "last_held": held}
    lim.close()
    return out


def relay() -> dict:
    """For the fuzzing test (which makes the messages with hypothesis, outside this cgroup): each
    stdin line is a hex-encoded request, sent on a fresh watching connection; each reply is
    written back as one JSON line ({"closed": true} when the agent closed without one)."""
    print(json.dumps({"tid": threading.get_native_id()}), flush=True)
    n = 0
    for line in sys.stdin:
        sock = _watch()
        try:
            sock.send(bytes.fromhex(line.strip()))
            try:
                data, anc, _, _ = sock.recvmsg(4096, socket.CMSG_SPACE(8))
            except OSError:
                data, anc = b"", []
            for _, _, payload in anc:
                for i in range(0, len(payload) - 3, 4):
                    os.close(int.from_bytes(payload[i:i + 4], "little"))
            print(json.dumps({"reply": json.loads(data)} if data else {"closed": True}), flush=True)
        finally:
            sock.close()
        n += 1
    return {"relayed": n}


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "measure":
        result = measure(int(sys.argv[2]))
    elif mode == "attack":
        result = attack(int(sys.argv[2]))
    elif mode == "cap":
        result = cap(int(sys.argv[2]))
    elif mode == "restart":
        result = restart(int(sys.argv[2]), forked=sys.argv[3:] == ["forked"])
    elif mode == "relay":
        result = relay()
    elif mode == "fork":
        result = fork(int(sys.argv[2]))
    elif mode == "crowd":
        result = crowd(int(sys.argv[2]))
    else:
        result = hold(float(sys.argv[2]))
    print(json.dumps(result), flush=True)
