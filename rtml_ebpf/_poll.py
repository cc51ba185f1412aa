"""The poll backend: cgroup files, cached for a minimum interval.

Staleness: an answer is at most ``min_interval`` old (default 10 ms) plus the
time of one file read; limits are re-read at most every ``limit_interval``
(1 s). A burst that grows faster than that can overshoot: that is what the
eBPF backend is for. The hot path costs one monotonic clock read and a
compare while the cache is fresh.
"""

from __future__ import annotations

import threading
import time

from ._backend import Snapshot, room_from_snapshot
from ._cgroup import LimitInfo, MemoryCgroup
from ._rules import Rule, Usage, effective_used, evaluate

DEFAULT_MIN_INTERVAL = 0.010
DEFAULT_LIMIT_INTERVAL = 1.0


class PollFlag:
    """Answers ``flag[0]`` by refreshing the backend when the cache is stale."""

    __slots__ = ("_backend", "index")

    def __init__(self, backend: PollBackend, index: int) -> None:
        self._backend = backend
        self.index = index

    def __getitem__(self, _: int) -> bool:
        return self._backend.tripped(self.index)


class PollBackend:
    name = "poll"
    hooks: tuple[str, ...] = ()
    hot_never_raises = False  # a refresh reads files, which can fail
    needs_upkeep = False

    def __init__(
        self,
        cgroup: MemoryCgroup,
        reason: str,
        *,
        min_interval: float = DEFAULT_MIN_INTERVAL,
        limit_interval: float = DEFAULT_LIMIT_INTERVAL,
    ) -> None:
        self.cgroup = cgroup
        self.reason = reason
        self._interval_ns = int(min_interval * 1e9)
        self._limit_interval_ns = int(limit_interval * 1e9)
        self._rules: dict[int, Rule] = {}
        self._tripped: dict[int, bool] = {}
        self._trips: dict[int, int] = {}
        self._next_index = 0
        self._lock = threading.Lock()
        self._limits: LimitInfo | None = None
        self._limits_ns = 0
        self._last_ns = 0
        self._snapshot: Snapshot | None = None
        self._closed = False

    # -- rules --------------------------------------------------------------------------
    def add_rule(self, rule: Rule) -> PollFlag:
        with self._lock:
            index = self._next_index
            self._next_index += 1
            self._rules[index] = rule
            self._tripped[index] = False
            self._trips[index] = 0
        self._refresh()
        return PollFlag(self, index)

    def remove_rule(self, flag: object, fail_answer: bool = False) -> None:
        if isinstance(flag, PollFlag):
            with self._lock:
                self._rules.pop(flag.index, None)
                self._tripped.pop(flag.index, None)

    # -- hot path -----------------------------------------------------------------------
    def tripped(self, index: int) -> bool:
        if time.monotonic_ns() - self._last_ns >= self._interval_ns:
            self._refresh()
        return self._tripped.get(index, False)

    # -- readings -----------------------------------------------------------------------
    def _read_limits(self, now: int) -> LimitInfo:
        if self._limits is None or now - self._limits_ns >= self._limit_interval_ns:
            self._limits = self.cgroup.effective_limit()
            self._limits_ns = now
        return self._limits

    def read_now(self) -> Snapshot:
        """A reading with the limits re-read now (not from the cache)."""
        self._limits = None
        return self.read()

    def read(self) -> Snapshot:
        """One reading of the files (limits cached for ``limit_interval``), no OOM counter."""
        now = time.monotonic_ns()
        limits = self._read_limits(now)
        own = self.cgroup.read_usage()
        headroom: int | None = None
        for directory, limit in limits.limited:
            usage = own if directory == self.cgroup.directory else self.cgroup.read_usage(directory)
            room = limit - usage
            headroom = room if headroom is None else min(headroom, room)
        if limits.limit_bytes is not None and (
            headroom is None or limits.limit_bytes - own < headroom
        ):
            # the v1 hierarchical limit sits above what we can read: judge it by our own usage
            headroom = limits.limit_bytes - own
        rules = list(self._rules.values())  # one C-level copy: safe against a concurrent add_rule
        needs_ws = any(r.metric == "working_set" for r in rules) or not rules
        inactive = self.cgroup.read_inactive_file() if needs_ws else 0
        return Snapshot(
            usage=own,
            used=effective_used(own, limits.limit_bytes, headroom),
            inactive_file=inactive,
            limit=limits.limit_bytes,
            limit_source=limits.source,
            headroom=headroom,
            updated_ns=now,
            oom_kills=0,
        )

    def _refresh(self) -> None:
        # Read without the lock: a reader holding it across file reads would make every other
        # thread answer from a stale cache for as long as the GIL keeps it waiting between
        # reads (tens of ms under load, which a fast allocator turns into an OOM kill). Only
        # the evaluation and the publishing, no I/O, happen under the lock.
        if self._closed:
            return
        snap = self.read()
        usage = Usage(snap.used, snap.working_set, snap.limit)
        with self._lock:
            if snap.updated_ns < self._last_ns:
                return  # a newer reading was published meanwhile
            for index, rule in self._rules.items():
                was = self._tripped.get(index, False)
                now_tripped = evaluate(rule, usage, was)
                if now_tripped and not was and index in self._trips:
                    self._trips[index] += 1
                self._tripped[index] = now_tripped
            self._snapshot = snap
            self._last_ns = snap.updated_ns

    def trips(self, flag: object) -> int:
        return self._trips.get(flag.index, 0) if isinstance(flag, PollFlag) else 0

    def hot(self, flag: object) -> PollFlag:
        assert isinstance(flag, PollFlag)
        return flag

    def room(self, flag: object) -> tuple[int | None, int | None]:
        rule = self._rules.get(flag.index) if isinstance(flag, PollFlag) else None
        if rule is None:
            return None, None
        return room_from_snapshot(self.snapshot(flag, full=False), rule)

    def maintain(self, flag: object) -> None:
        pass

    def thread_meter(self) -> None:
        return None

    def snapshot(self, flag: object = None, full: bool = True) -> Snapshot:
        if not full:
            if time.monotonic_ns() - self._last_ns >= self._interval_ns:
                self._refresh()
            if self._snapshot is not None:
                return self._snapshot
        snap = self.read()
        try:
            oom = self.cgroup.oom_kills()
        except OSError:
            oom = 0
        return Snapshot(**{**snap.__dict__, "oom_kills": oom})

    def close(self) -> None:
        self._closed = True
