"""The demo's HTTP service: each request decodes a large payload into memory and holds it.

    python -m rtml_ebpf.demo.service --guard {none,poll,ebpf} --payload-mib 24 --hold 0.3

The handler builds its payload in 1 MiB chunks and asks the guard before each
chunk, as a service would before each allocation: the same code for every
guard, only the check differs. Prints the port it listens on, then serves.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from rtml_ebpf.config import PAGE_SIZE

CHUNK = 1 << 20
PAGE = PAGE_SIZE
JSON_DOC = json.dumps([{"id": i, "name": f"item-{i}", "tags": ["a", "b", "c"], "score": i * 0.5}
                       for i in range(60_000)])  # about 5 MB


def make_guard(kind: str, threshold: float) -> Callable[[], bool]:
    if kind == "none":
        return lambda: False
    from rtml_ebpf import Limiter

    if kind == "poll":
        # The OpenTelemetry memory_limiter style: the usage is read at most once a second.
        lim = Limiter(backend="poll", threshold=threshold, poll_interval=1.0)
    else:
        lim = Limiter(backend="ebpf", threshold=threshold)
    return lim.is_mem_limit_reached


def serve(guard_kind: str, threshold: float, payload: int, hold: float, port: int = 0) -> None:
    limit_reached = make_guard(guard_kind, threshold)
    ones = b"\x01" * (CHUNK // PAGE)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - quiet
            pass

        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            if self.path == "/json":  # a request that parses a 5 MB JSON document (the CPU-bound kind)
                doc = json.loads(JSON_DOC)
                self.reply(200, b"ok %d\n" % len(doc))
                return
            chunks: list[bytearray] = []
            for _ in range(payload // CHUNK):
                if limit_reached():
                    chunks.clear()
                    self.reply(503, b"memory limit reached, retry later\n")
                    return
                buf = bytearray(CHUNK)
                buf[::PAGE] = ones  # fault every page in, like a decoder writing its output
                chunks.append(buf)
            time.sleep(hold)
            self.reply(200, b"ok %d\n" % len(chunks))

        def reply(self, code: int, body: bytes) -> None:
            self.send_response(code)
            if code == 503:
                self.send_header("Retry-After", "1")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    server.daemon_threads = True
    print(server.server_address[1], flush=True)
    server.serve_forever()


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--guard", choices=("none", "poll", "ebpf"), required=True)
    p.add_argument("--threshold", type=float, default=0.8)
    p.add_argument("--payload-mib", type=int, default=24)
    p.add_argument("--hold", type=float, default=0.3)
    p.add_argument("--port", type=int, default=0)
    a = p.parse_args()
    serve(a.guard, a.threshold, a.payload_mib * CHUNK, a.hold, a.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
