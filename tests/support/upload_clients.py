"""Chunked upload clients for tests/root/test_admission_drain.py: each sends a whole chunked body
the server will refuse partway, as real clients do, and reports whether the 503 reached it.

- ``raw_upload``: a socket that keeps sending while another thread reads (curl, browsers);
- ``http_client_upload``: ``http.client`` with ``encode_chunked``, which sends the whole body
  before it reads the response (requests and urllib do the same).
"""

from __future__ import annotations

import http.client
import socket
import threading
import time
from collections.abc import Iterator


def chunks(total: int, size: int = 64 << 10) -> Iterator[bytes]:
    for _ in range(total // size):
        yield b"x" * size


def raw_upload(port: int, total: int, path: str = "/upload", timeout: float = 10) -> tuple[int, str]:
    """(status, what happened): status 0 when no response came (a reset, or nothing)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    got = bytearray()
    errors: list[str] = []

    def read() -> None:
        try:
            while data := sock.recv(65536):
                got.extend(data)
        except OSError as exc:
            errors.append(f"read: {exc!r}")

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n".encode())
        for chunk in chunks(total):
            sock.sendall(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
        sock.sendall(b"0\r\n\r\n")
    except OSError as exc:
        errors.append(f"send: {exc!r}")
    reader.join(timeout)
    sock.close()
    head = bytes(got).partition(b"\r\n")[0]
    status = int(head.split()[1]) if head.startswith(b"HTTP/") else 0
    return status, "; ".join(errors) or "ok"


def http_client_upload(port: int, total: int, path: str = "/upload", timeout: float = 10) -> tuple[int, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", path, body=chunks(total), encode_chunked=True)
        response = conn.getresponse()
        response.read()
        return response.status, "ok"
    except OSError as exc:
        return 0, repr(exc)
    finally:
        conn.close()


def measure(port: int, total: int, n: int) -> dict[str, list[tuple[int, str]]]:
    out: dict[str, list[tuple[int, str]]] = {"raw": [], "http.client": []}
    for _ in range(n):
        out["raw"].append(raw_upload(port, total))
        out["http.client"].append(http_client_upload(port, total))
        time.sleep(0.02)
    return out
