"""A request admitted *pending* (learning, or alone, with its body still to come) whose app never
reads the body and allocates anyway takes its slot (issue 19's review, item 4): real uvicorn and
gunicorn in a real 256 MiB cgroup, clients on raw sockets that send 2 bytes of a 64 KiB body and
stall. Before, such a request held no slot for as long as it ran: its memory was in no budget."""

from __future__ import annotations

import json
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from support.cgroups import MiB, needs_bpf, needs_cgroups

from rtml_ebpf.demo.cgroups import ChildCgroup
from rtml_ebpf.demo.flood import free_port, wait_listening

pytestmark = [pytest.mark.root, needs_bpf, needs_cgroups]

ENV = {"RTML_THRESHOLD": "0.8", "RTML_METRIC": "usage"}
SUPPORT = str(Path(__file__).resolve().parent.parent / "support")
SERVERS = {
    "asgi": lambda port: [sys.executable, "-m", "uvicorn", "--port", str(port), "--log-level", "warning",
                          "pending_app:asgi_app"],
    "wsgi": lambda port: [sys.executable, "-m", "gunicorn", "-w", "1", "-k", "gthread", "--threads", "4",
                          "-b", f"127.0.0.1:{port}", "--log-level", "warning", "pending_app:wsgi_app"],
}
STALLED = b"POST /ignore HTTP/1.1\r\nHost: t\r\nContent-Length: 65536\r\n\r\nxx"


@contextmanager
def server(kind: str) -> Iterator[int]:
    port = free_port()
    with ChildCgroup(256 * MiB, prefix="rtml-pending") as cg:
        proc = cg.popen(SERVERS[kind](port), env={**ENV, "PYTHONPATH": SUPPORT}, cwd=SUPPORT)
        try:
            wait_listening(port, proc)
            yield port
            assert cg.oom_kills() == 0
        finally:
            proc.terminate()
            proc.wait(20)


def status_of(sock: socket.socket, timeout: float = 10) -> int:
    sock.settimeout(timeout)
    got = b""
    try:
        while b"\r\n" not in got and (data := sock.recv(4096)):
            got += data
    except OSError:
        pass
    return int(got.split()[1]) if got.startswith(b"HTTP/") else 0


def get_stats(port: int) -> dict:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"GET /stats HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        got = b""
        while data := s.recv(65536):
            got += data
    return json.loads(got.partition(b"\r\n\r\n")[2])


@pytest.mark.parametrize("kind", ["asgi", "wsgi"])
def test_a_pending_request_that_ignores_its_body_and_allocates_takes_its_slot(kind: str) -> None:
    """Two requests to a fresh (learning) route, each sending 2 bytes of its body and stalling;
    the app ignores the body and allocates 48 MiB. The first to grow takes the route's learning
    slot (it is in flight in the stats); the second cannot (one learning request at a time) and
    is answered 503. Before: both ran to 200 while the stats counted none in flight."""
    with server(kind) as port:
        get_stats(port)  # the worker is up (gunicorn's master listens before its worker has the app)
        a = socket.create_connection(("127.0.0.1", port))
        b = socket.create_connection(("127.0.0.1", port))
        try:
            a.sendall(STALLED)
            b.sendall(STALLED)
            deadline = time.monotonic() + 1.2  # (each holds its 48 MiB 1.5 s)
            while (during := get_stats(port))["inflight"] != 1 and time.monotonic() < deadline:
                time.sleep(0.05)
            statuses = sorted([status_of(a), status_of(b)])
        finally:
            a.close()
            b.close()
        after = get_stats(port)
    assert during["inflight"] == 1, during
    assert statuses == [200, 503], statuses
    assert after["rejected_learning"] == 1 and after["inflight"] == 0, after
