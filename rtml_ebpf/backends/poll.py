"""The poll backend: cgroup files, cached for a minimum interval.

Staleness: an answer is at most ``min_interval`` old (default 10 ms) plus the
time of one file read; limits are re-read at most every ``limit_interval``
(1 s). A burst that grows faster than that can overshoot: that is what the
eBPF backend is for. The hot path costs one monotonic clock read and a
compare while the cache is fresh.

Identity: files are read by path, and a path outlives its cgroup (``rmdir`` then ``mkdir``
makes another cgroup there, with another id). So the directory's inode is compared with the
cgroup id taken at construction after every reading of the files (one stat) and on any file
error. Once it differs, or the directory is gone, the backend is *gone* for good:
it reads no file again, the hot path answers the fail answer, and readings (``snapshot``,
``room``) raise CgroupNotFound. It never answers from another cgroup made at the same path.
"""

from __future__ import annotations

import os
import threading
import time

from .._cgroup import LimitInfo, MemoryCgroup
from .._high import HighSnapshot, ceiling_used, snapshot_ceiling
from .._rules import Rule, Usage, evaluate
from ..errors import CgroupNotFound
from .base import Snapshot

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
        cgroup_id: int | None = None,
    ) -> None:
        self.cgroup = cgroup
        self.cgroup_id = cgroup.cgroup_id if cgroup_id is None else cgroup_id
        self.gone: str | None = None  # why the cgroup is no longer the one we were built for
        self._fail_answer = False
        self.reason = reason
        self._interval_ns = int(min_interval * 1e9)
        self._limit_interval_ns = int(limit_interval * 1e9)
        self._rules: dict[int, Rule] = {}
        self._tripped: dict[int, bool] = {}
        self._trips: dict[int, int] = {}
        self._next_index = 0
        self._lock = threading.Lock()
        self._limits: LimitInfo | None = None
        self._highs: LimitInfo = LimitInfo(None, None, ())  # memory.high on the path, read with the limits
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
        if self.gone is not None:
            return self._fail_answer
        if time.monotonic_ns() - self._last_ns >= self._interval_ns:
            self._refresh()  # the first CgroupNotFound reaches the Limiter, which logs it once
        return self._tripped.get(index, False)

    def set_fail_answer(self, fail_answer: bool) -> None:
        self._fail_answer = fail_answer

    # -- identity -----------------------------------------------------------------------
    def _check_identity(self) -> None:
        """Raise CgroupNotFound (and stay gone) unless the directory is still our cgroup."""
        if self.gone is None:
            try:
                ino = os.stat(self.cgroup.directory).st_ino
            except FileNotFoundError:
                self.gone = f"cgroup {self.cgroup.directory} was removed"
            except OSError:
                return  # not knowable now (EACCES, ...): the file error is reported as it is
            else:
                if ino != self.cgroup_id:
                    self.gone = (f"cgroup {self.cgroup.directory} was removed and made again (id {self.cgroup_id}, "
                                 f"now {ino}): another cgroup")
        if self.gone is not None:
            raise CgroupNotFound(f"{self.gone}; close this Limiter and build a new one for the cgroup that is "
                                 "there now")

    # -- readings -----------------------------------------------------------------------
    def _read_limits(self, now: int) -> LimitInfo:
        if self._limits is None or now - self._limits_ns >= self._limit_interval_ns:
            self._highs = self.cgroup.effective_high()
            self._limits = self.cgroup.effective_limit()
            self._limits_ns = now
        return self._limits

    def limits_now(self) -> LimitInfo:
        """The effective limit read now (CgroupNotFound once the path is not our cgroup)."""
        try:
            limits = self.cgroup.effective_limit()
        except OSError:
            self._check_identity()
            raise
        self._check_identity()
        return limits

    def read_now(self) -> Snapshot:
        """A reading with the limits re-read now (not from the cache)."""
        self._limits = None
        return self.read()

    def read(self) -> Snapshot:
        """One reading of the files (limits cached for ``limit_interval``), no OOM counter.
        CgroupNotFound once the cgroup is gone (see the module's docstring)."""
        if self.gone is not None:
            self._check_identity()
        try:
            snap = self._read()
        except OSError:
            self._check_identity()  # removed: CgroupNotFound; else the file error as it was
            raise
        # After the reading, not before: ids are never reused, so a directory that is still
        # ours now was ours when its files were read. One stat (~1 us) beside ~30 us of reads.
        self._check_identity()
        return snap

    def _read(self) -> HighSnapshot:
        now = time.monotonic_ns()
        limits = self._read_limits(now)
        highs = self._highs
        own = self.cgroup.read_usage()
        usages = {self.cgroup.directory: own}

        def least_room(bounds: tuple[tuple[str, int], ...]) -> int | None:
            out: int | None = None
            for directory, bound in bounds:
                if directory not in usages:
                    usages[directory] = self.cgroup.read_usage(directory)
                out = bound - usages[directory] if out is None else min(out, bound - usages[directory])
            return out

        headroom = least_room(limits.limited)
        high_room = least_room(highs.limited)
        if limits.limit_bytes is not None and (
            headroom is None or limits.limit_bytes - own < headroom
        ):
            # the v1 hierarchical limit sits above what we can read: judge it by our own usage
            headroom = limits.limit_bytes - own
        rules = list(self._rules.values())  # one C-level copy: safe against a concurrent add_rule
        needs_ws = any(r.metric == "working_set" for r in rules) or not rules
        inactive = self.cgroup.read_inactive_file() if needs_ws else 0
        return HighSnapshot(
            usage=own,
            used=ceiling_used(own, limits.limit_bytes, headroom, highs.limit_bytes, high_room),
            inactive_file=inactive,
            limit=limits.limit_bytes,
            limit_source=limits.source,
            headroom=headroom,
            updated_ns=now,
            oom_kills=0,
            high=highs.limit_bytes,
            high_source=highs.source,
            high_room=high_room,
        )

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
            self._check_identity()
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

    def snapshot(self, flag: object = None, full: bool = True) -> Snapshot:
        if self.gone is not None:
            self._check_identity()
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
        return HighSnapshot(**{**snap.__dict__, "oom_kills": oom})

    def close(self) -> None:
        self._closed = True
