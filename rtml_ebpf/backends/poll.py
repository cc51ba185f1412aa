"""The poll backend: cgroup files, cached for a minimum interval.

Staleness: an answer is at most ``min_interval`` old (default 10 ms) plus the
time of one file read; limits are re-read at most every ``limit_interval``
(1 s). A burst that grows faster than that can overshoot: that is what the
eBPF backend is for. The hot path costs one monotonic clock read and a
compare while the cache is fresh.

Identity (``rtml_ebpf.cgroup_files``): once the directory is gone or another cgroup, the
backend is *gone* for good: it reads no file again, the hot path answers the fail answer, and
readings (``snapshot``, ``room``) raise CgroupNotFound. It never answers from another cgroup
made at the same path.
"""

from __future__ import annotations

import threading
import time

from .._cgroup import MemoryCgroup
from .._high import HighSnapshot, snapshot_ceiling
from .._rules import Rule, Usage, evaluate
from ..cgroup_files import DEFAULT_LIMIT_INTERVAL, CgroupFiles
from ..snapshot import Snapshot

DEFAULT_MIN_INTERVAL = 0.010


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
        cgroup_id: int | None = None,
    ) -> None:
        self.files = CgroupFiles(cgroup, limit_interval=limit_interval, cgroup_id=cgroup_id)
        self._fail_answer = False
        self.reason = reason
        self._interval_ns = int(min_interval * 1e9)
        self._rules: dict[int, Rule] = {}
        self._tripped: dict[int, bool] = {}
        self._trips: dict[int, int] = {}
        self._next_index = 0
        self._lock = threading.Lock()
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
        if self.gone is not None:
            return self._fail_answer
        if time.monotonic_ns() - self._last_ns >= self._interval_ns:
            self._refresh()  # the first CgroupNotFound reaches the Limiter, which logs it once
        return self._tripped.get(index, False)

    def set_fail_answer(self, fail_answer: bool) -> None:
        self._fail_answer = fail_answer

    # -- readings -----------------------------------------------------------------------
    @property
    def gone(self) -> str | None:
        return self.files.gone

    @property
    def cgroup(self) -> MemoryCgroup:
        return self.files.cgroup

    @cgroup.setter
    def cgroup(self, cgroup: MemoryCgroup) -> None:
        self.files.cgroup = cgroup

    def read(self) -> Snapshot:
        rules = list(self._rules.values())  # one C-level copy: safe against a concurrent add_rule
        return self.files.read(any(r.metric == "working_set" for r in rules) or not rules)

    def _refresh(self) -> None:
        # Read without the lock: a reader holding it across file reads would make every other
        # thread answer from a stale cache for as long as the GIL keeps it waiting between
        # reads (tens of ms under load, which a fast allocator turns into an OOM kill). Only
        # the evaluation and the publishing, no I/O, happen under the lock.
        if self._closed:
            return
        snap = self.read()
        usage = Usage(snap.used, snap.working_set, snapshot_ceiling(snap))  # fractions of max or high
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
        if self.gone is not None:
            self.files.check_identity()
        rule = self._rules.get(flag.index) if isinstance(flag, PollFlag) else None
        if rule is None:
            return None, None
        snap = self.snapshot(flag, full=False)
        value = snap.working_set if rule.metric == "working_set" else snap.used
        trip = rule.trip.resolve(snapshot_ceiling(snap))
        return (None if trip is None else trip - value), snap.headroom

    def maintain(self, flag: object) -> None:
        pass

    def thread_meter(self) -> None:
        return None

    def waker(self, flag: object, poll: float) -> None:
        return None  # no programs: the enforcer polls

    def snapshot(self, flag: object = None, full: bool = True) -> Snapshot:
        if self.gone is not None:
            self.files.check_identity()
        if not full:
            if time.monotonic_ns() - self._last_ns >= self._interval_ns:
                self._refresh()
            if self._snapshot is not None:
                return self._snapshot
        snap = self.read()
        try:
            oom = self.files.cgroup.oom_kills()
        except OSError:
            oom = 0
        return HighSnapshot(**{**snap.__dict__, "oom_kills": oom})

    def close(self) -> None:
        self._closed = True
