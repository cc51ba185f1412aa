"""The agent's client connections and the caps that keep any one client from taking them all.

A connection is a lease (server.py). Caps, checked at accept from the kernel's word on who
the peer is (never from anything it sends): the whole agent, each uid, each memory cgroup and
each pid. A refused connection gets an error reply saying which cap and what to do.
"""

from __future__ import annotations

import socket
from collections import Counter
from dataclasses import dataclass, field
from typing import TypeVar

from . import peer as _peer

MAX_CONNECTIONS = 4096
MAX_PER_UID = 1024  # one uid (a pod's root, or every pod of one user) cannot take every connection
MAX_PER_CGROUP = 256  # one container cannot either, whatever its uids
MAX_PER_PID = 32

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
