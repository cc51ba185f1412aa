"""Stats: one reading of a Limiter's cgroup, as ``Limiter.stats()`` returns it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ._high import binding, ceiling


@dataclass(frozen=True)
class Stats:
    """A reading of the limiter's cgroup. Sizes in bytes; None means "no limit"."""

    usage_bytes: int  # the cgroup's own usage (memory.current / memory.usage_in_bytes)
    working_set_bytes: int  # usage - inactive_file (as the tightest ancestor sees usage)
    limit_bytes: int | None  # effective limit: the tightest memory.max on the path (where the OOM killer acts)
    limit_source: str | None  # the cgroup directory that sets it
    threshold_bytes: int | None  # where the limiter trips (fractions of the lower of max and high), None: no limit
    headroom_bytes: int | None  # threshold - metric: what may still be allocated before tripping
    limit_headroom_bytes: int | None  # bytes left before the kernel's OOM killer acts
    metric: str
    tripped: bool
    backend: str
    backend_reason: str
    hooks: tuple[str, ...]
    cgroup_path: str
    cgroup_dir: str
    cgroup_id: int
    cgroup_version: int
    updated_ns: int  # CLOCK_MONOTONIC (time.monotonic_ns()) of the reading
    oom_kills: int  # ebpf: OOM victims seen since watched; poll: the cgroup's counter
    faults: int | None  # ebpf with the page_fault_user hook: user page faults seen since watched
    soft_threshold_bytes: int | None = None
    level: str = "OK"
    trips: int = 0  # clear -> tripped transitions of the hard level
    soft_trips: int = 0
    relief_runs: int = 0
    relief_bytes: int = 0
    growth_bytes_per_s: float | None = None  # smoothed rate of the metric's "used" (see _growth.py)
    seconds_to_limit: float | None = None  # at that rate, until the OOM killer's limit; None if not growing
    tripped_ahead: bool = False  # trip_ahead_ms: the limit is that close at the current rate
    high_bytes: int | None = None  # lowest memory.high on the path (cgroup v2; None: unset, and always on v1)
    high_source: str | None = None  # the cgroup directory that sets it
    binding: str | None = None  # which one fractions apply to: "max" (limit_bytes) or "high" (high_bytes)
    pressure_some_avg10: float | None = None  # memory.pressure (PSI, v2): % of the last 10 s some task stalled
    pressure_some_total_us: int | None = None  # stalled time since the cgroup was made, microseconds
    pressure_full_avg10: float | None = None  # ... in which every task stalled
    pressure_full_total_us: int | None = None
    pressure_reason: str | None = None  # why the pressure fields are None (cgroup v1, no PSI)
    stalling: bool | None = None  # some stall over STALL_SHARE of the last second (_stall.py); None: no PSI

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def build_stats(snap: Any, *, metric: str, trip: Any, soft: Any, fields: dict[str, Any]) -> Stats:
    """A Stats from a backend reading (``snap``, an rtml_ebpf._high.HighSnapshot) and the
    Limiter's own fields (backend, cgroup, levels, relief, growth, pressure: passed through).
    Fractions resolve against the ceiling: the lower of max and memory.high (_high.py)."""
    value = snap.working_set if metric == "working_set" else snap.used
    high = getattr(snap, "high", None)
    top = ceiling(snap.limit, high)
    threshold = None if (trip.ppm is not None and top is None) else trip.resolve(top)
    soft_bytes = None if soft is None or (soft.ppm is not None and top is None) else soft.resolve(top)
    return Stats(
        usage_bytes=snap.usage,
        working_set_bytes=snap.working_set,
        limit_bytes=snap.limit,
        limit_source=snap.limit_source,
        threshold_bytes=threshold,
        headroom_bytes=None if threshold is None else threshold - value,
        limit_headroom_bytes=snap.headroom,
        metric=metric,
        oom_kills=snap.oom_kills,
        faults=snap.faults,
        soft_threshold_bytes=soft_bytes,
        high_bytes=high,
        high_source=getattr(snap, "high_source", None),
        binding=binding(snap.limit, high),
        **fields,
    )
