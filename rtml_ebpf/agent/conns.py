"""The agent's client connections and the caps that keep any one client from taking them all.

A connection is a lease (leases.py). Caps, checked at accept from the kernel's word on who
the peer is (never from anything it sends): the whole agent, each uid, each memory cgroup and
each pid. A refused connection gets an error reply saying which cap and what to do: it is held
(not counted, at most MAX_REFUSING at once) until its request arrives or REFUSE_GRACE passes, and
answered after its request is read, so the close does not reset the connection under the reply
(a Unix socket closed with unread data reports ECONNRESET before the queued reply).

:class:`Connections` runs them on the loop's selector: accept, read one whole SEQPACKET message
non-blocking, rate-limit, decode, hand it to the ops (handlers.py), reply, fail, close. Every
byte a client sends is hostile: a request that trips anything unexpected fails that connection
alone (logged), never the agent.
"""

from __future__ import annotations

import array
import logging
import selectors
import socket
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

from ..errors import CapacityError, CgroupNotFound, ConfigError, RtmlError
from . import peer as _peer
from . import protocol

log = logging.getLogger("rtml_ebpf.agent")

REQUEST_TIMEOUT = 1.0  # a connection must ask within this
MAX_REQUESTS_PER_SECOND = 20  # per connection, after its watch
MAX_WAKE_LEVELS_PER_SECOND = 200  # per wake connection: its enforcer moves the level as requests come and go
LOGGED_FAILURES = 20  # unexpected request failures logged with their traceback; then counted only

MAX_CONNECTIONS = 4096
MAX_PER_UID = 1024  # one uid (a pod's root, or every pod of one user) cannot take every connection
MAX_PER_CGROUP = 256  # one container cannot either, whatever its uids
MAX_PER_PID = 32
MAX_REFUSING = 256  # refused connections held for their request before the reply; beyond: answered at once
REFUSE_GRACE = 0.5
REFUSING = "refusing"  # the selector data of a held refused connection: (REFUSING, fd)

RuleKey = tuple[int, int, int, int]
_K = TypeVar("_K", int, str)


@dataclass
class Conn:
    sock: socket.socket
    peer: _peer.Peer
    deadline: float
    cgroup_key: str = ""
    cgid: int = 0
    keys: list[RuleKey] = field(default_factory=list)
    window_start: float = 0.0
    window_count: int = 0
    events_scope: str | None = None  # an events subscriber: "" every cgroup (root), else its own path
    wake_cgid: int = 0  # a wake connection: the cgroup whose wake records it gets (wakes.py)


class ConnLimits:
    """Open connections counted by uid, cgroup and pid."""

    def __init__(self, total: int = MAX_CONNECTIONS, per_uid: int = MAX_PER_UID, per_cgroup: int = MAX_PER_CGROUP,
                 per_pid: int = MAX_PER_PID) -> None:
        self.total, self.per_uid, self.per_cgroup, self.per_pid = total, per_uid, per_cgroup, per_pid
        self.open = 0
        self.by_uid: Counter[int] = Counter()
        self.by_cgroup: Counter[str] = Counter()
        self.by_pid: Counter[int] = Counter()

    def admit(self, conn: Conn) -> str | None:
        """Count ``conn`` in, or say (without counting it) which cap it would pass."""
        p = conn.peer
        if self.open >= self.total:
            return f"the agent has {self.total} connections open; retry later"
        if self.by_uid[p.uid] >= self.per_uid:
            return (f"uid {p.uid} has {self.per_uid} connections open to the agent; close some (one Limiter per "
                    "process is enough)")
        if conn.cgroup_key and self.by_cgroup[conn.cgroup_key] >= self.per_cgroup:
            return (f"cgroup {conn.cgroup_key} has {self.per_cgroup} connections open to the agent; close some "
                    "(one Limiter per process is enough)")
        if self.by_pid[p.pid] >= self.per_pid:
            return f"pid {p.pid} has {self.per_pid} connections open; share a Limiter"
        self.open += 1
        self.by_uid[p.uid] += 1
        self.by_pid[p.pid] += 1
        if conn.cgroup_key:
            self.by_cgroup[conn.cgroup_key] += 1
        return None

    def release(self, conn: Conn) -> None:
        p = conn.peer
        self.open -= 1
        _down(self.by_uid, p.uid)
        _down(self.by_pid, p.pid)
        if conn.cgroup_key:
            _down(self.by_cgroup, conn.cgroup_key)


def _down(counter: Counter[_K], key: _K) -> None:
    counter[key] -= 1
    if counter[key] <= 0:
        del counter[key]


Handle = Callable[[int, "Conn", dict[str, Any]], None]  # (connection id, connection, decoded request)
Release = Callable[[int, "Conn"], None]  # a closing connection's leases


class Connections:
    """The open client connections (by fd, also their lease id) on the loop's selector."""

    def __init__(self, selector: selectors.BaseSelector, listener: socket.socket, handle: Handle,
                 release: Release) -> None:
        self.selector = selector
        self.listener = listener
        self.handle = handle
        self.release = release
        self.by_fd: dict[int, Conn] = {}
        self.limits = ConnLimits()
        self.refusing: dict[int, tuple[socket.socket, str, float]] = {}  # fd -> (socket, reason, deadline)
        self.errors = 0  # requests refused or failed
        self.failures = 0  # requests that tripped something unexpected (logged, the connection failed)

    def __len__(self) -> int:
        return len(self.by_fd)

    def __iter__(self) -> Iterator[Conn]:
        """The open connections as of now (a copy: closing one while iterating is safe)."""
        return iter(list(self.by_fd.values()))

    def accept(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE and friends: shed, keep serving
                log.warning("rtml-ebpf agent: accept failed: %s", exc)
                return
            sock.setblocking(False)
            try:
                peer = _peer.peer_of(sock)
            except OSError as exc:
                # Not "no pidfd here": the peer is gone (its pid may be reused) or unknowable.
                self.errors += 1
                self._hold_refused(sock, f"the agent cannot identify this connection's process "
                                         f"({exc.strerror or exc}); connect again from a live process")
                continue
            conn = Conn(sock, peer, time.monotonic() + REQUEST_TIMEOUT, _peer.cgroup_key(peer))
            why = self.limits.admit(conn)
            if why is not None:
                self.errors += 1
                self._hold_refused(sock, why)
                peer.close()
                continue
            fd = sock.fileno()
            self.by_fd[fd] = conn
            self.selector.register(sock, selectors.EVENT_READ, fd)

    def _hold_refused(self, sock: socket.socket, why: str) -> None:
        if len(self.refusing) >= MAX_REFUSING:
            _refuse(sock, why)
            return
        fd = sock.fileno()
        self.refusing[fd] = (sock, why, time.monotonic() + REFUSE_GRACE)
        self.selector.register(sock, selectors.EVENT_READ, (REFUSING, fd))

    def _answer_refused(self, fd: int) -> None:
        entry = self.refusing.pop(fd, None)
        if entry is None:
            return
        sock, why, _ = entry
        try:
            self.selector.unregister(sock)
        except (KeyError, ValueError):
            pass
        _refuse(sock, why)

    def readable(self, fd: int | tuple[str, int]) -> None:
        if isinstance(fd, tuple):
            self._answer_refused(fd[1])
            return
        conn = self.by_fd.get(fd)
        if conn is None:
            return
        try:
            data, _, flags, _ = conn.sock.recvmsg(protocol.MAX_MESSAGE + 1)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.close(fd)
            return
        if not data:
            self.close(fd)  # the client went: its lease ends
            return
        if flags & socket.MSG_TRUNC or len(data) > protocol.MAX_MESSAGE:
            self.fail(fd, f"message over {protocol.MAX_MESSAGE} bytes")
            return
        now = time.monotonic()
        if now - conn.window_start >= 1.0:
            conn.window_start, conn.window_count = now, 0
        conn.window_count += 1
        cap = MAX_WAKE_LEVELS_PER_SECOND if conn.wake_cgid else MAX_REQUESTS_PER_SECOND
        if conn.window_count > cap:
            self.fail(fd, f"over {cap} requests per second")
            return
        try:
            self.handle(fd, conn, protocol.decode(data))
        except (ConfigError, CgroupNotFound, CapacityError) as exc:
            self.fail(fd, str(exc))
        except (OSError, RtmlError) as exc:
            log.warning("rtml-ebpf agent: request of pid %d failed: %s", conn.peer.pid, exc)
            self.fail(fd, f"the agent failed to serve the request: {exc}")
        except Exception as exc:  # noqa: BLE001 - whatever a client triggers fails its connection alone
            self.failures += 1
            if self.failures <= LOGGED_FAILURES:
                log.exception("rtml-ebpf agent: request of pid %d (uid %d) failed unexpectedly; connection "
                              "closed, serving on", conn.peer.pid, conn.peer.uid)
            elif self.failures % 1000 == 0:
                log.warning("rtml-ebpf agent: %d requests failed unexpectedly so far (%r)", self.failures, exc)
            self.fail(fd, f"the agent could not serve this request ({type(exc).__name__}); it was logged")

    def expire(self, now: float) -> None:
        """Connections that asked nothing within REQUEST_TIMEOUT fail; refused ones that sent
        nothing within REFUSE_GRACE get their answer."""
        for fd, (_, _, deadline) in list(self.refusing.items()):
            if now > deadline:
                self._answer_refused(fd)
        for fd, conn in list(self.by_fd.items()):
            if not conn.keys and conn.events_scope is None and not conn.wake_cgid and now > conn.deadline:
                self.fail(fd, f"no request within {REQUEST_TIMEOUT:g} s")

    def send(self, fd: int, message: dict[str, Any], fds: list[int] | None = None) -> None:
        conn = self.by_fd[fd]
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
        conn.sock.sendmsg([protocol.encode(message)], anc)

    def fail(self, fd: int, why: str) -> None:
        """An error reply, then the connection closes; the agent keeps serving."""
        self.errors += 1
        conn = self.by_fd.get(fd)
        if conn is not None:
            try:
                conn.sock.sendmsg([protocol.encode({"ok": False, "error": why})])
            except OSError:
                pass
        self.close(fd)

    def close(self, fd: int) -> None:
        conn = self.by_fd.pop(fd, None)
        if conn is None:
            return
        self.release(fd, conn)
        self.limits.release(conn)
        try:
            self.selector.unregister(conn.sock)
        except (KeyError, ValueError):
            pass
        conn.sock.close()
        conn.peer.close()

    def close_all(self) -> None:
        for fd in list(self.by_fd):
            self.close(fd)
        for fd in list(self.refusing):
            self._answer_refused(fd)


def _refuse(sock: socket.socket, why: str) -> None:
    """An error reply on a connection that was never admitted, then close it. What the client
    sent is read first (at most a few messages, without waiting)."""
    for _ in range(4):
        try:
            if not sock.recv(protocol.MAX_MESSAGE + 1, socket.MSG_DONTWAIT):
                break
        except OSError:
            break
    try:
        sock.sendmsg([protocol.encode({"ok": False, "error": why})])
    except OSError:
        pass
    sock.close()
