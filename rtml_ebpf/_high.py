"""memory.high beside memory.max: the ceiling that fractional thresholds apply to.

Under systemd's ``MemoryHigh=`` or kubelet's MemoryQoS the kernel throttles a cgroup in
reclaim once it passes memory.high, well before memory.max; a threshold of max would then
trip after the service is already crawling. So a fraction applies to the *ceiling*: the
lower of the tightest memory.max and the lowest memory.high on the path (cgroup v2; v1 has
no memory.high). The OOM headroom stays the room to memory.max. The BPF programs apply the
same rule (bpf/rtml.bpf.c, update_slot); keep the two in step.
"""

from __future__ import annotations

from dataclasses import dataclass

from .snapshot import Snapshot


@dataclass(frozen=True)
class HighSnapshot(Snapshot):
    """A Snapshot that also carries memory.high (the backends of this package build these)."""

    high: int | None = None  # lowest memory.high on the path in bytes; None: none set (always on v1)
    high_source: str | None = None  # the cgroup directory that sets it
    high_room: int | None = None  # min(high - usage) over the ancestors with a memory.high


def ceiling(limit: int | None, high: int | None) -> int | None:
    """What fractions apply to: the lower of max and high (None: neither is set)."""
    if high is None:
        return limit
    return high if limit is None else min(limit, high)


def binding(limit: int | None, high: int | None) -> str | None:
    """Which boundary is the ceiling: "high", "max", or None when there is none."""
    if high is not None and (limit is None or high < limit):
        return "high"
    return "max" if limit is not None else None


def snapshot_ceiling(snap: Snapshot) -> int | None:
    """The ceiling of any Snapshot (one without memory.high: its limit)."""
    return ceiling(snap.limit, getattr(snap, "high", None))


def ceiling_used(usage: int, limit: int | None, headroom: int | None, high: int | None,
                 high_room: int | None) -> int:
    """Usage as the tightest boundary sees it: ceiling - least room (to max or to high), so a
    busy sibling under a shared memory.high counts as it does under a shared max."""
    top = ceiling(limit, high)
    rooms = [r for r in (headroom, high_room) if r is not None]
    if top is None or not rooms:
        return usage
    return max(0, top - min(rooms))
