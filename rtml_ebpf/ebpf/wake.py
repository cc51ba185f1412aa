"""The kernel wakes the enforcer (own load): a level in, records out.

The enforcer (rtml_ebpf/admission/enforce.py) knows after each look the lowest usage at which its
next look could end a request. It writes that level into the slot's config (``wake_pages``, in
the used pages the rules see) and blocks on the ``wake_events`` ring; on the charge path, when
the slot's used pages reach the level, the programs write one record (which cgroup, which thread
charged, how much) with a forced wake-up, so the enforcer looks within microseconds of the charge
instead of at its next poll (rtml.h: ``struct rtml_wake``). Level 0 (nothing in flight) costs the
programs a compare.

One consumer per ring: two readers steal each other's records. The process that loaded the
programs consumes its own ring here (one :class:`WakeHub` per :class:`Runtime`); the node agent
consumes its ring in its loop. A forked child that inherited its parent's load gets no waker: the
level is one word per slot, and the parent's and every sibling's enforcer would overwrite it.
The ring is read through its epoll fd with ``select`` (the GIL is released while it blocks) and
``ring_buffer__consume`` (libbpf's own ``ring_buffer__poll`` is those two calls).
"""

from __future__ import annotations

import ctypes
import errno
import itertools
import os
import select
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..config import PAGE_SIZE
from ..errors import LoadError
from . import abi
from . import libbpf as _libbpf

if TYPE_CHECKING:
    from .runtime import Runtime

WAKE_SIZE = ctypes.sizeof(abi.Wake)


@dataclass(frozen=True)
class WakeRecord:
    """One wake: the cgroup's usage reached the level; ``tid`` is the thread that charged then
    (a kernel thread id: ``threading.get_native_id()`` of a Python thread)."""

    cgroup_id: int
    tid: int
    pid: int
    used_bytes: int
    level_bytes: int
    time_ns: int  # CLOCK_MONOTONIC (time.monotonic_ns())

    @classmethod
    def of(cls, w: abi.Wake) -> WakeRecord:
        return cls(int(w.cgroup_id), int(w.tid), int(w.pid), int(w.used_pages) * PAGE_SIZE,
                   int(w.wake_pages) * PAGE_SIZE, int(w.time_ns))


class WakeRing:
    """The ``wake_events`` ring of one loaded (or adopted) object: ``fileno()`` for a selector,
    ``drain()``, ``wait(timeout)``. One reader per ring."""

    def __init__(self, map_fd: int) -> None:
        self._got: list[WakeRecord] = []
        self._cb = _libbpf.RING_SAMPLE_FN(self._on_sample)  # kept alive while the ring is
        lib = _libbpf.lib()
        self._rb = lib.ring_buffer__new(map_fd, self._cb, None, None)
        if not self._rb:
            raise LoadError("open ring buffer", "map wake_events", ctypes.get_errno() or 0, _libbpf.take_log())
        self._fd = int(lib.ring_buffer__epoll_fd(self._rb))

    def _on_sample(self, ctx: int | None, data: int, size: int) -> int:
        if size >= WAKE_SIZE:
            self._got.append(WakeRecord.of(abi.Wake.from_buffer_copy(ctypes.string_at(data, WAKE_SIZE))))
        return 0

    def fileno(self) -> int:
        """An epoll fd that turns readable when records are waiting."""
        return self._fd

    def drain(self) -> list[WakeRecord]:
        """Every record waiting now (never blocks)."""
        if not self._rb:
            return []
        ret = _libbpf.lib().ring_buffer__consume(self._rb)
        if ret < 0:
            raise LoadError("read ring buffer", "map wake_events", -ret, os.strerror(-ret))
        got, self._got = self._got, []
        return got

    def wait(self, timeout: float) -> list[WakeRecord]:
        """Block until records come (the programs force the wake-up) or ``timeout`` seconds pass."""
        got = self.drain()
        if got or not self._rb:
            return got
        try:
            ready, _, _ = select.select([self._fd], [], [], max(0.0, timeout))
        except OSError as exc:
            if exc.errno != errno.EINTR:
                raise
            return []
        return self.drain() if ready else []

    def close(self) -> None:
        if self._rb:
            _libbpf.lib().ring_buffer__free(self._rb)
            self._rb = None


class WakeHub:
    """The wake of one Runtime: its ring, and the levels its wakers asked for (each slot's word
    is the lowest level asked for it: whichever enforcer could act first must be woken)."""

    def __init__(self, ring: WakeRing, config_words: memoryview) -> None:
        self.ring = ring
        self._words: memoryview | None = config_words
        self._closing = False
        self._mu = threading.Lock()
        self._reader = threading.Lock()  # one reader at a time: the others poll (see Waker.wait)
        self._levels: dict[int, tuple[int, int]] = {}  # waker id -> (slot, pages)
        self._ids = itertools.count(1)
        self.records = 0

    def new_id(self) -> int:
        return next(self._ids)

    def set_level(self, waker: int, slot: int, pages: int) -> None:
        with self._mu:
            if pages > 0:
                self._levels[waker] = (slot, pages)
            else:
                self._levels.pop(waker, None)
            lowest = min((p for s, p in self._levels.values() if s == slot), default=0)
            if self._words is not None:
                self._words[slot * abi.CONFIG_WORDS + abi.C_WAKE] = lowest

    def wait(self, timeout: float, poll: float) -> list[WakeRecord] | None:
        """Records, or None when another thread reads the ring now (sleep ``poll`` instead)."""
        if self._closing or not self._reader.acquire(blocking=False):
            time.sleep(min(timeout, poll))
            return None
        try:
            got = self.ring.wait(timeout)
        finally:
            with self._mu:
                if self._closing:
                    self.ring.close()  # closed while we read: freed by the reader, never under it
                self._reader.release()
        self.records += len(got)
        return got

    def close(self) -> None:
        """Free the ring, now or when its reader returns; the levels go with the mapping."""
        with self._mu:
            self._closing = True
            self._words = None
            if self._reader.acquire(blocking=False):
                try:
                    self.ring.close()
                finally:
                    self._reader.release()


class Waker:
    """One enforcer's handle on its cgroup's wake (see rtml_ebpf.admission.enforce.Waker)."""

    def __init__(self, runtime: Runtime, hub: WakeHub, cgroup_id: int, poll: float) -> None:
        self.runtime = runtime
        self.hub = hub
        self.cgroup_id = cgroup_id
        self.poll = poll
        self._id = hub.new_id()
        self._slot: int | None = None
        self.level_bytes = 0

    def set_margin(self, margin: int | None) -> None:
        """Wake when usage has grown by ``margin`` bytes from now (at once when <= 0); None: off."""
        slot = self.runtime.slot_of(self.cgroup_id)
        if slot != self._slot and self._slot is not None:
            self.hub.set_level(self._id, self._slot, 0)  # the cgroup moved slots (re-watched)
        self._slot = slot
        if slot is None:
            self.level_bytes = 0
            return
        pages = 0
        if margin is not None:
            used = self.runtime.used_pages(slot)
            pages = max(1, used + margin // PAGE_SIZE)
        self.level_bytes = pages * PAGE_SIZE
        self.hub.set_level(self._id, slot, pages)

    def wait(self, timeout: float) -> list[WakeRecord] | None:
        """Records of this cgroup, [] at the timeout, None when not the ring's reader now."""
        if self._slot is None:
            time.sleep(min(timeout, self.poll))  # not watched here (any more): the caller polls
            return None
        got = self.hub.wait(timeout, self.poll)
        if got is None:
            return None
        return [r for r in got if r.cgroup_id == self.cgroup_id]

    def close(self) -> None:
        if self._slot is not None:
            self.hub.set_level(self._id, self._slot, 0)
            self._slot = None
        self.level_bytes = 0
