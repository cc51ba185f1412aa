"""A forked process's own connection to the node agent (a pre-fork server's worker, a
multiprocessing child), for every request/response round trip it makes: the thread meter's
``meter`` asks (agent_meter.py) and a Limiter's ``stats()`` (agent.py).

The agent takes the asker's identity from the connection's peer credentials: asked on a parent's
lease, it refuses the child's tids as not the peer's and closes the lease; and the parent's and
the child's replies on one connection would cross (each reads whatever reply comes first). So a
child opens one connection of its own per agent socket and cgroup, at first use, watching the
cgroup and rule of an inherited lease; the agent's caps apply to it (32 connections per pid, 256
per cgroup). The parent's connections are left alone; the child's closes when it exits.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

from ..errors import AgentUnavailable

log = logging.getLogger("rtml_ebpf")
RETRY_FULL = 30.0  # seconds before a refused connection is asked for again (e.g. the agent's caps)
RECONNECT = 1.0  # seconds before a forked process opens its connection again after the agent closed it
OWN_CHECK = 0.2  # seconds between looks at whether the agent closed that connection

# backends/agent.py's _request: (rule, scope, socket path, cgroup) -> (socket, reply, fds)
Connect = Callable[[Any, str, str, "str | None"], "tuple[socket.socket, dict[str, Any], list[int]]"]


def fork_watch(backend: Any, connect: Connect) -> socket.socket:
    """A connection of this (forked) process watching the cgroup and rule of a lease ``backend``
    holds for the process that built it, as that lease's own request did (root clients naming
    another cgroup send it). AgentUnavailable says why not."""
    lease = None if backend.lost else next((x for x in backend._leases if not x.retired), None)
    if lease is None:
        raise AgentUnavailable(backend.lost or "the Limiter this process inherited holds no rule")
    sock, reply, fds = connect(lease.rule, backend._scope, backend.path, backend._other)
    for fd in fds:
        os.close(fd)  # the verdict and beat pages: the inherited mappings are the same pages
    if reply.get("cgroup_id") != backend._cgid:
        sock.close()
        raise AgentUnavailable(f"the agent serves cgroup {reply.get('cgroup')} to this process, not the "
                               "Limiter's: a forked process in another cgroup measures with getrusage")
    return sock


class _Own:
    """A forked process's own connection to the agent (see the module's docstring): opened at
    first use, reopened (after RECONNECT) when the agent closed it."""

    __slots__ = ("connect", "live", "mu", "retry_at", "check_at", "why")

    def __init__(self, connect: Connect | None) -> None:
        self.connect = connect
        self.live: tuple[socket.socket, threading.Lock] | None = None
        self.mu = threading.Lock()
        self.retry_at = self.check_at = 0.0
        self.why: str | None = None  # why this process has no connection of its own, when it has none

    def get(self, backends: list[Any]) -> tuple[socket.socket, threading.Lock] | None:
        live, now = self.live, time.monotonic()
        if live is not None:
            if now < self.check_at:
                return live
            self.check_at = now + OWN_CHECK
            if not _peer_closed(live[0]):
                return live
            self.drop("the agent closed this process's meter connection (restarted?)", now + RECONNECT)
        if now < self.retry_at or self.connect is None or not self.mu.acquire(blocking=False):
            return None  # (another thread is connecting: this measurement is getrusage's, none waits)
        try:
            if self.live is not None or now < self.retry_at:
                return self.live
            for backend in backends:
                try:
                    self.live = (fork_watch(backend, self.connect), threading.Lock())
                    self.why = None
                    return self.live
                except (AgentUnavailable, OSError) as exc:
                    self.why = f"no meter connection of this forked process: {exc}"[:400]
            self.retry_at = now + RETRY_FULL  # e.g. the agent's cap of connections per cgroup
            log.info("rtml-ebpf: %s; its threads are measured with getrusage, its stats() have no counters",
                     self.why)
            return None
        finally:
            self.mu.release()

    def drop(self, why: str, retry_at: float) -> None:
        live, self.live, self.why, self.retry_at = self.live, None, why, retry_at
        if live is not None:
            live[0].close()


def _peer_closed(sock: socket.socket) -> bool:
    try:
        return sock.recv(1, socket.MSG_DONTWAIT | socket.MSG_PEEK) == b""
    except (BlockingIOError, InterruptedError):
        return False
    except OSError:
        return True


# A forked process's own connection per agent socket and cgroup: one for its meter asks and its
# Limiters' stats() alike (the agent counts each against its caps per pid and per cgroup).
_OWNS: dict[tuple[str, int], _Own] = {}


def _own_for(key: tuple[str, int] | None, connect: Connect | None) -> _Own:
    if key is None:
        return _Own(connect)
    with _MU:
        own = _OWNS.get(key)
        if own is None:
            own = _OWNS[key] = _Own(connect)
        elif own.connect is None:
            own.connect = connect
        return own


def own_connection(backend: Any, connect: Connect) -> tuple[socket.socket, threading.Lock] | None:
    """For a round trip (``stats``) of a backend a parent process made: this process's own
    connection, opened at first use, shared with its meter; None while there is none (another
    thread is opening it, or the agent refused: see the meter's stats()["fallback"]). The
    parent's lease would carry both processes' requests and the replies would cross."""
    return _own_for((backend.path, backend._cgid), connect).get([backend])

_MU = threading.Lock()
BACKENDS: weakref.WeakSet[Any] = weakref.WeakSet()  # agent.py's AgentBackends
WAKERS: weakref.WeakSet[Any] = weakref.WeakSet()  # and the enforcer wakes they made (agent_wake.py)


def _after_fork_in_child() -> None:
    """A parent's own connections (we are a child of a child) are not ours: our copies close
    (the connection stays the parent's, and the agent sees it close when the parent exits). A
    backend's lease lock held by another thread at the fork would stay held: the child's starts
    free. A wake connection made before the fork is the parent's (the enforcer keeps its waker):
    the child's copy closes, so the child's enforcer's next use of it fails and it asks for a
    wake of its own (else both processes would set the one level and take each other's wake
    records)."""
    global _MU
    _MU = threading.Lock()
    for own in _OWNS.values():
        if own.live is not None:
            own.live[0].close()
    _OWNS.clear()
    for backend in list(BACKENDS):
        backend._sock_lock = threading.Lock()
    for waker in list(WAKERS):
        sock = getattr(waker, "sock", None)
        if sock is not None:
            sock.close()  # (kept in place: its next send or recv fails, "the wake connection failed")
    WAKERS.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)
