"""A memory cgroup's files read into a :class:`~rtml_ebpf.snapshot.Snapshot`, by path, with the
limits cached for a while and the cgroup's identity checked after every reading.

Used by the poll backend (its readings) and by the eBPF side (a slot's first reading, the
upkeep). Identity: files are read by path, and a path outlives its cgroup (``rmdir`` then
``mkdir`` makes another cgroup there, with another id). So the directory's inode is compared
with the cgroup id taken at construction after every reading of the files (one stat) and on any
file error. Once it differs, or the directory is gone, the reader is *gone* for good: every
reading raises CgroupNotFound, and it never answers from another cgroup made at the same path.
"""

from __future__ import annotations

import os
import time

from ._cgroup import LimitInfo, MemoryCgroup
from ._high import HighSnapshot, ceiling_used
from .errors import CgroupNotFound

DEFAULT_LIMIT_INTERVAL = 1.0


class CgroupFiles:
    """The files of one memory cgroup, read on demand (no thread, no rules)."""

    def __init__(self, cgroup: MemoryCgroup, *, limit_interval: float = DEFAULT_LIMIT_INTERVAL,
                 cgroup_id: int | None = None) -> None:
        self.cgroup = cgroup
        self.cgroup_id = cgroup.cgroup_id if cgroup_id is None else cgroup_id
        self.gone: str | None = None  # why the cgroup is no longer the one we were built for
        self._limit_interval_ns = int(limit_interval * 1e9)
        self._limits: LimitInfo | None = None
        self._highs: LimitInfo = LimitInfo(None, None, ())  # memory.high on the path, read with the limits
        self._limits_ns = 0

    def check_identity(self) -> None:
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
            self.check_identity()
            raise
        self.check_identity()
        return limits

    def read_now(self) -> HighSnapshot:
        """A reading with the limits re-read now (not from the cache)."""
        self._limits = None
        return self.read()

    def read(self, needs_working_set: bool = True) -> HighSnapshot:
        """One reading of the files (limits cached for ``limit_interval``), no OOM counter;
        inactive_file only when ``needs_working_set``. CgroupNotFound once the cgroup is gone
        (see the module's docstring)."""
        if self.gone is not None:
            self.check_identity()
        try:
            snap = self._read(needs_working_set)
        except OSError:
            self.check_identity()  # removed: CgroupNotFound; else the file error as it was
            raise
        # After the reading, not before: ids are never reused, so a directory that is still
        # ours now was ours when its files were read. One stat (~1 us) beside ~30 us of reads.
        self.check_identity()
        return snap

    def _read(self, needs_working_set: bool) -> HighSnapshot:
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
        inactive = self.cgroup.read_inactive_file() if needs_working_set else 0
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
