"""Hostile and honest clients of the node agent, run by the tests (and the soak) as uid 65534.

    python hostile_client.py payloads              send each hostile message, print the replies
    python hostile_client.py hog NPROC PER SECONDS NPROC processes each hold PER watch connections
    python hostile_client.py builds N              build N agent Limiters, timing each, and check

Prints one JSON line. Only the standard library and rtml_ebpf.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time

RULE = {"metric": "usage", "trip_ppm": 900000, "clear_ppm": 880000}
PAYLOADS: list[bytes] = [
    b"[" * 4000,
    b"{" * 2000,
    b'{"a":' * 800 + b"1" + b"}" * 800,
    b"[" * 4096,
    b"1" * 4000,
    b'{"v": 1, "op": "watch", "rules": [{"metric": "usage", "trip_bytes": 1' + b"0" * 3000 + b"}]}",
    b'{"v": 1e999, "op": "watch"}',
    b'{"v": NaN}',
    b'{"v": -Infinity}',
    b'{"v": 1, "op": "\\ud800"}',
    b'{"\\udfff": 1}',
    b"\xff\xfe\xfd",
    b"\xed\xa0\x80",  # a surrogate in UTF-8 bytes
    b'{"v": 1, "v": 1, "op": "watch"}',
    b'{"v": 1, "op": "watch", "rules": [[[[[[[[[[]]]]]]]]]]}',
    b'{"v": 1, "op": "watch", "rules": [{"metric": {"x": 1}, "trip_ppm": 1}]}',
    b'{"v": 1, "op": "watch", "rules": [{"metric": "usage", "trip_ppm": true, "clear_ppm": 0}]}',
    b'{"v": 1, "op": "watch", "scope": ["pod"], "rules": [{}]}',
    b'{"v": 1, "op": ["watch"]}',
    b'{"v": [1]}',
    b'{"v": 1, "op": "events", "scope": {"a": 1}}',
    b"null",
    b'"string"',
    b"\x00" * 100,
    b'{"v": 1, "op": "watch", "rules": [' + b'{"metric": "usage", "trip_ppm": 1, "clear_ppm": 0},' * 40 + b"1]}",
]


def _ask(payload: bytes) -> str:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.settimeout(5)
    try:
        sock.connect(os.environ["RTML_AGENT_SOCKET"])
        sock.send(payload)
        data, anc, _, _ = sock.recvmsg(8192, socket.CMSG_SPACE(8))
        for _, _, raw in anc:
            for i in range(0, len(raw) - 3, 4):
                os.close(int.from_bytes(raw[i:i + 4], "little"))
        return data.decode("utf-8", "replace")
    except OSError as exc:
        return f"OSError {exc!r}"
    finally:
        sock.close()


def payloads() -> dict:
    return {"replies": [_ask(p) for p in PAYLOADS]}


def _hold(per: int, seconds: float, out: int) -> None:
    socks, errors, ok = [], {}, 0
    for _ in range(per):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        s.settimeout(5)
        try:
            s.connect(os.environ["RTML_AGENT_SOCKET"])
            s.send(json.dumps({"v": 1, "op": "watch", "rules": [RULE]}).encode())
            data, anc, _, _ = s.recvmsg(8192, socket.CMSG_SPACE(8))
            for _, _, raw in anc:
                for i in range(0, len(raw) - 3, 4):
                    os.close(int.from_bytes(raw[i:i + 4], "little"))
            reply = json.loads(data) if data else {"ok": False, "error": "closed"}
        except (OSError, ValueError) as exc:
            reply = {"ok": False, "error": repr(exc)}
        if reply.get("ok"):
            ok += 1
            socks.append(s)
        else:
            key = str(reply.get("error"))[:300]
            errors[key] = errors.get(key, 0) + 1
            s.close()
    os.write(out, (json.dumps({"ok": ok, "errors": errors}) + "\n").encode())
    time.sleep(seconds)


def hog(nproc: int, per: int, seconds: float) -> dict:
    """nproc processes of this uid and cgroup, each holding up to ``per`` leases for ``seconds``."""
    r, w = os.pipe()
    pids = []
    for _ in range(nproc):
        pid = os.fork()
        if pid == 0:
            os.close(r)
            try:
                _hold(per, seconds, w)
            finally:
                os._exit(0)
        pids.append(pid)
    os.close(w)
    total, errors, reported = 0, {}, 0
    with os.fdopen(r) as f:
        for line in f:
            got = json.loads(line)
            total += got["ok"]
            for k, v in got["errors"].items():
                errors[k] = errors.get(k, 0) + v
            reported += 1
            if reported == nproc:  # every lease asked for: the test acts while they are held
                print(json.dumps({"held": total, "errors": errors}), flush=True)
    for pid in pids:
        os.waitpid(pid, 0)
    return {"held": total, "errors": errors}


def builds(n: int) -> dict:
    from rtml_ebpf import Limiter

    times, backends, fresh = [], set(), []
    for _ in range(n):
        t0 = time.perf_counter()
        lim = Limiter(backend="agent", threshold=0.9, relief=False)
        times.append(time.perf_counter() - t0)
        backends.add(lim.backend)
        fresh.append(bool(lim._backend._alive()))  # type: ignore[attr-defined]  # the beat is fresh
        lim.close()
        time.sleep(0.05)
    return {"times": times, "backends": sorted(backends), "fresh": fresh}


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "payloads":
        result = payloads()
    elif mode == "hog":
        result = hog(int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]))
    else:
        result = builds(int(sys.argv[2]))
    print(json.dumps(result), flush=True)
