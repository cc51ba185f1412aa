"""The enforcer's wake, through the agent: the agent is the one consumer of its programs' wake
ring (two readers steal each other's records), and forwards each record to the clients of that
cgroup that asked (op ``wake``, protocol.py), on a connection of their own.

The level the programs compare with is one word per watched cgroup (config ``wake_pages``): the
agent writes the lowest level its cgroup's clients asked for, so whichever client's enforcer
could act first is woken; 0 when none asks. A client is told only its own cgroup's records, and
the charging thread only when it is one of its own threads (by the kernel's pid, translated into
the thread's own pid namespace, which is the client's): it learns nothing of other processes.
A client that does not read loses records (counted), never the agent's time.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

from ..config import PAGE_SIZE
from ..ebpf import abi
from ..ebpf.slots import Slots
from ..ebpf.wake import WakeRecord, WakeRing
from ..errors import RtmlError
from . import protocol
from .conns import Conn
from .programs import NodePrograms

log = logging.getLogger("rtml_ebpf.agent")


@dataclass
class Asked:
    cgid: int
    pages: int  # 0: off


def ns_tid(tid: int) -> int:
    """A host thread id as the thread's own pid namespace numbers it (NSpid's last field), 0
    when it cannot be read (gone)."""
    try:
        with open(f"/proc/{tid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"NSpid:"):
                    return int(line.split()[-1])
    except (OSError, ValueError):
        pass
    return 0


class WakeFeed:
    """The ring, the levels the clients asked for, and what could not be delivered."""

    def __init__(self, node: NodePrograms, slots: Slots) -> None:
        self.slots = slots
        self.ring: WakeRing | None = None
        self.asked: dict[int, Asked] = {}  # connection fd -> its cgroup and level
        self.records = 0  # read from the ring
        self.dropped = 0  # not sent to a client whose socket was full
        fd = node.loaded.fds.get("wake_events")
        if fd is None:
            return
        try:
            self.ring = WakeRing(fd)
        except RtmlError as exc:
            log.warning("rtml-ebpf agent: no wake ring, clients' enforcers poll: %s", exc)

    def fileno(self) -> int | None:
        return self.ring.fileno() if self.ring is not None else None

    def ask(self, fd: int, cgid: int, level_bytes: int) -> None:
        """Connection ``fd`` wants a wake when its cgroup's used bytes reach ``level_bytes`` (0: off)."""
        self.asked[fd] = Asked(cgid, (level_bytes + PAGE_SIZE - 1) // PAGE_SIZE if level_bytes > 0 else 0)
        self._write(cgid)

    def release(self, fd: int) -> None:
        asked = self.asked.pop(fd, None)
        if asked is not None:
            self._write(asked.cgid)

    def _write(self, cgid: int) -> None:
        """The lowest level asked for ``cgid`` into its slot's config word."""
        state = self.slots.by_cgid.get(cgid)
        words = self.slots.config_words
        if state is None or words is None:
            return  # not watched (any more): nothing compares with a level
        lowest = min((a.pages for a in self.asked.values() if a.cgid == cgid and a.pages > 0), default=0)
        words[state.index * abi.CONFIG_WORDS + abi.C_WAKE] = lowest

    def read_ring(self, conns: Iterable[Conn]) -> None:
        """The ring is readable: each record to the wake connections of its cgroup."""
        if self.ring is None:
            return
        try:
            got = self.ring.drain()
        except RtmlError as exc:
            log.warning("rtml-ebpf agent: %s", exc)
            return
        self.records += len(got)
        if not got or not self.asked:
            return
        listening = [c for c in conns if c.wake_cgid and c.sock.fileno() in self.asked]
        for rec in got:
            for conn in listening:
                if conn.wake_cgid == rec.cgroup_id:
                    self._send(conn, rec)

    def _send(self, conn: Conn, rec: WakeRecord) -> None:
        own = rec.pid == conn.peer.pid  # the peer's pid as the agent's (host) namespace sees it
        message = {"cgroup_id": rec.cgroup_id, "tid": ns_tid(rec.tid) if own else 0, "used": rec.used_bytes,
                   "level": rec.level_bytes, "ns": rec.time_ns}
        try:
            conn.sock.send(protocol.encode(message))
        except (BlockingIOError, InterruptedError):
            self.dropped += 1  # a client that does not read loses wakes, not the agent's time
        except OSError:
            pass  # gone: the loop closes it

    def close(self) -> None:
        if self.ring is not None:
            self.ring.close()
            self.ring = None
