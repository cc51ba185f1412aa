"""OOM kills on the node, read and fanned out: from the programs' ring (the oom_victim hook), or
where the kernel lacks the hook from the watched cgroups' memory.events counters. Each kill is
one JSON line in the log, counted, and sent to the events subscribers allowed to see its cgroup
(who may see what is decided when they subscribe, handlers.py).

A subscriber that does not read loses records (counted), never stalls the loop.
"""

from __future__ import annotations

import collections
import ctypes
import json
import logging
from collections.abc import Iterable

from .. import _cgroup
from .. import oom as _oom
from ..ebpf import abi
from ..ebpf.ring import OomRing
from ..errors import ConfigError, RtmlError
from . import protocol
from .conns import Conn
from .programs import NodePrograms

log = logging.getLogger("rtml_ebpf.agent")


class OomFeed:
    """The agent's source of OOM kills, what it counted and what it could not deliver."""

    def __init__(self, node: NodePrograms) -> None:
        self.node = node
        self.ring: OomRing | None = None
        self.counted: _oom.CountedOoms | None = None
        self.events: collections.Counter[str] = collections.Counter()  # by source
        self.dropped = 0  # records not sent to a subscriber whose socket was full
        self._next_count = 0.0
        if protocol.OOM_HOOK in node.hooks:
            self.ring = OomRing(node.loaded.fds["oom_events"])
        else:
            self.counted = _oom.CountedOoms()
            log.warning("rtml-ebpf agent: %s", _oom.NO_HOOK)

    @property
    def source(self) -> str:
        return "bpf" if self.ring is not None else "memory.events"

    @property
    def note(self) -> str:
        """What a subscriber is told of the source's limits ("" with the hook)."""
        return "" if self.ring is not None else _oom.NO_HOOK

    @property
    def lost(self) -> int:
        """Victims the ring had no room for (the programs count them in ctl)."""
        ctl = self.node.loaded.maps.get("ctl")
        return int(abi.Ctl.from_buffer_copy(ctl[: ctypes.sizeof(abi.Ctl)]).events_lost) if ctl is not None else 0

    def read_ring(self, subscribers: Iterable[Conn]) -> None:
        """The ring is readable: its records, delivered."""
        assert self.ring is not None
        try:
            raw = self.ring.drain()
        except RtmlError as exc:
            log.warning("rtml-ebpf agent: %s", exc)
            return
        self.deliver([_oom.from_event(e) for e in raw], subscribers)

    def count(self, now: float, cgroups: Iterable[tuple[int, _cgroup.MemoryCgroup]],
              subscribers: Iterable[Conn]) -> None:
        """Without the hook: the counters of ``cgroups`` read every COUNT_INTERVAL, rises delivered."""
        if self.counted is None or now < self._next_count:
            return
        self._next_count = now + _oom.COUNT_INTERVAL
        self.deliver(self.counted.read(cgroups), subscribers)

    def deliver(self, kills: list[_oom.OomKill], subscribers: Iterable[Conn]) -> None:
        """Each kill: one JSON line in the log, counted, and sent to the events subscribers
        that may see its cgroup."""
        if not kills:
            return
        subs = list(subscribers)
        for kill in kills:
            self.events[kill.source] += kill.count
            record = kill.as_dict()
            log.warning("rtml-ebpf agent: OOM kill %s", json.dumps(record, separators=(",", ":")))
            try:
                data = protocol.encode(record)
            except ConfigError:
                continue  # over the message size (a path of 10 levels of 128 bytes): in the log only
            for conn in subs:
                scope = conn.events_scope
                if scope is None or (scope and not _oom.within(kill.cgroup, scope)):
                    continue
                try:
                    conn.sock.send(data)
                except (BlockingIOError, InterruptedError):
                    self.dropped += 1  # a subscriber that does not read loses events, not us
                except OSError:
                    pass  # gone: the loop closes it

    def fileno(self) -> int | None:
        """The ring's fd for the selector (None: nothing to wait on, the counters are polled)."""
        return self.ring.fileno() if self.ring is not None else None

    def close(self) -> None:
        if self.ring is not None:
            self.ring.close()
