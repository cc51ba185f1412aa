"""The agent's HTTP endpoint (/metrics, /healthz, /readyz) on a thread of its own, so that no
scraper, prober or attacker on the port can stall the verdict loop.

Each connection is a small non-blocking state machine on this thread's selector: it must send
a request head of at most MAX_HEAD bytes and take its whole answer within DEADLINE seconds, or
it is dropped. At most MAX_CONNECTIONS are open; a new one past that evicts the oldest, so a
crowd of slow clients cannot keep a health probe out. HTTP/1.0, one request per connection.
"""

from __future__ import annotations

import logging
import selectors
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from . import metrics_access
from .health import Health
from .metrics import CONTENT_TYPE

log = logging.getLogger("rtml_ebpf.agent")

MAX_HEAD = 8192
MAX_CONNECTIONS = 64
DEADLINE = 2.0  # seconds for a whole exchange: request in, answer out
PATHS = ("/metrics", "/healthz", "/readyz")


@dataclass
class _Exchange:
    sock: socket.socket
    deadline: float
    started: float
    inbox: bytearray = field(default_factory=bytearray)
    outbox: bytes = b""
    sent: int = 0


def _response(status: str, body: bytes, ctype: str = "text/plain; charset=utf-8", head_only: bool = False) -> bytes:
    head = (f"HTTP/1.0 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
            "Cache-Control: no-store\r\nConnection: close\r\n\r\n")
    return head.encode() + (b"" if head_only else body)


def parse_head(raw: bytes) -> tuple[str, str, dict[str, str]] | str:
    """(method, path, headers) of a request head, or the reason it is refused."""
    try:
        text = raw.decode("latin-1")
    except UnicodeDecodeError:  # pragma: no cover - latin-1 decodes every byte
        return "undecodable"
    lines = text.split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1.") or not parts[1].startswith("/"):
        return "malformed request line"
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            return "malformed header line"
        headers[name.lower()] = value.strip()
    return parts[0], parts[1].split("?", 1)[0], headers


class HttpServer:
    """The listener and its exchanges, served by one daemon thread until :meth:`stop`."""

    def __init__(self, sock: socket.socket, health: Health, render: Callable[[], bytes],
                 token: str | None, metrics_served: bool) -> None:
        self.sock = sock
        self.health = health
        self.render = render
        self.token = token
        self.metrics_served = metrics_served  # False: beyond loopback without a token (health only)
        self.exchanges: dict[int, _Exchange] = {}
        self.served = 0
        self.dropped = 0
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._stopping = False
        sock.setblocking(False)
        self._selector.register(sock, selectors.EVENT_READ, None)
        self._selector.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._thread = threading.Thread(target=self._run, name="rtml-agent-http", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping = True
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        for fd in list(self.exchanges):
            self._drop(fd)
        self._selector.close()
        self.sock.close()
        self._wake_r.close()
        self._wake_w.close()

    # -- the thread -------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stopping:
            try:
                self._step()
            except Exception:  # noqa: BLE001 - this thread must outlive any one exchange's surprise
                log.exception("rtml-ebpf agent: HTTP step failed; serving on")
                time.sleep(0.05)

    def _step(self) -> None:
        for key, mask in self._selector.select(0.25):
            if key.data is None:
                self._accept()
            elif key.data == "wake":
                return
            else:
                fd = key.data
                try:
                    if mask & selectors.EVENT_READ:
                        self._read(fd)
                    if mask & selectors.EVENT_WRITE:
                        self._write(fd)
                except Exception as exc:  # noqa: BLE001 - one bad exchange fails alone
                    log.warning("rtml-ebpf agent: HTTP exchange failed: %r", exc)
                    self._drop(fd)
        now = time.monotonic()
        for fd, ex in list(self.exchanges.items()):
            if now > ex.deadline:
                self._drop(fd)

    def _accept(self) -> None:
        for _ in range(64):
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE and friends: shed, keep serving
                log.warning("rtml-ebpf agent: HTTP accept failed: %s", exc)
                return
            conn.setblocking(False)
            if len(self.exchanges) >= MAX_CONNECTIONS:
                oldest = min(self.exchanges, key=lambda f: self.exchanges[f].started)
                self._drop(oldest)
            now = time.monotonic()
            fd = conn.fileno()
            self.exchanges[fd] = _Exchange(conn, now + DEADLINE, now)
            self._selector.register(conn, selectors.EVENT_READ, fd)

    def _read(self, fd: int) -> None:
        ex = self.exchanges.get(fd)
        if ex is None or ex.outbox:
            return
        try:
            chunk = ex.sock.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(fd)
            return
        if not chunk:
            self._drop(fd)
            return
        ex.inbox += chunk
        end = ex.inbox.find(b"\r\n\r\n")
        if end < 0:
            if len(ex.inbox) > MAX_HEAD:
                self._answer(fd, ex, _response("431 Request Header Fields Too Large",
                                               f"a request head is at most {MAX_HEAD} bytes\n".encode()))
            return
        if end > MAX_HEAD:
            self._answer(fd, ex, _response("431 Request Header Fields Too Large",
                                           f"a request head is at most {MAX_HEAD} bytes\n".encode()))
            return
        self._answer(fd, ex, self._respond(ex.sock, bytes(ex.inbox[:end])))

    def _respond(self, sock: socket.socket, head: bytes) -> bytes:
        parsed = parse_head(head)
        if isinstance(parsed, str):
            return _response("400 Bad Request", f"{parsed}; send GET {' or '.join(PATHS)} HTTP/1.1\n".encode())
        method, path, headers = parsed
        if method not in ("GET", "HEAD"):
            return _response("405 Method Not Allowed", b"GET only\n")
        head_only = method == "HEAD"
        if path == "/healthz":
            return _response(*self.health.healthz(), head_only=head_only)
        if path == "/readyz":
            return _response(*self.health.readyz(), head_only=head_only)
        if path != "/metrics":
            return _response("404 Not Found", f"rtml-ebpf agent: GET {', '.join(PATHS)}\n".encode(),
                             head_only=head_only)
        if not self.metrics_served:
            return _response("403 Forbidden", b"the metrics of every cgroup are not served beyond loopback without "
                             b"a token: start the agent with --metrics-token-file\n", head_only=head_only)
        refused = metrics_access.decide(sock, headers, self.token)
        if refused is not None:
            return _response(refused[0], refused[1].encode(), head_only=head_only)
        return _response("200 OK", self.render(), CONTENT_TYPE, head_only=head_only)

    def _answer(self, fd: int, ex: _Exchange, data: bytes) -> None:
        ex.outbox = data
        self.served += 1
        self._selector.modify(ex.sock, selectors.EVENT_WRITE, fd)
        self._write(fd)

    def _write(self, fd: int) -> None:
        ex = self.exchanges.get(fd)
        if ex is None or not ex.outbox:
            return
        try:
            n = ex.sock.send(memoryview(ex.outbox)[ex.sent:])
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(fd)
            return
        ex.sent += n
        if ex.sent >= len(ex.outbox):
            self._drop(fd, done=True)

    def _drop(self, fd: int, done: bool = False) -> None:
        ex = self.exchanges.pop(fd, None)
        if ex is None:
            return
        if not done:
            self.dropped += 1
        try:
            self._selector.unregister(ex.sock)
        except (KeyError, ValueError):
            pass
        ex.sock.close()
