"""Thresholds and the trip/clear rule that both backends evaluate the same way.

The BPF program applies exactly this logic in the kernel (bpf/rtml.bpf.c,
update_slot); the poll backend applies it here. Keep the two in step.
"""

from __future__ import annotations

from dataclasses import dataclass

PPM = 1_000_000
METRICS = ("working_set", "usage")


@dataclass(frozen=True)
class Threshold:
    """A fraction of the effective limit (``ppm``) or an absolute size (``nbytes``)."""

    ppm: int | None = None
    nbytes: int | None = None

    def resolve(self, limit: int | None) -> int | None:
        """Bytes this threshold stands for under ``limit``; None if it cannot apply."""
        if self.nbytes is not None:
            return self.nbytes
        if limit is None or self.ppm is None:
            return None
        return limit * self.ppm // PPM

    def describe(self) -> str:
        if self.nbytes is not None:
            return f"{self.nbytes} bytes"
        return f"{(self.ppm or 0) / PPM:.4g} of the limit"


@dataclass(frozen=True)
class Rule:
    """Trip when ``metric >= trip``; clear when ``metric < clear`` (hysteresis)."""

    metric: str
    trip: Threshold
    clear: Threshold


@dataclass(frozen=True)
class Usage:
    """What a rule looks at, in bytes."""

    used: int  # usage as the tightest ancestor sees it
    working_set: int  # used - inactive_file
    limit: int | None


def effective_used(own_usage: int, limit: int | None, headroom: int | None) -> int:
    """Usage seen by the tightest ancestor: ``limit - headroom`` when limited."""
    if limit is None or headroom is None:
        return own_usage
    return max(0, limit - headroom)


def evaluate(rule: Rule, usage: Usage, was_tripped: bool) -> bool:
    value = usage.working_set if rule.metric == "working_set" else usage.used
    if rule.trip.ppm is not None and usage.limit is None:
        return False  # a fraction of "no limit" never trips
    trip = rule.trip.resolve(usage.limit)
    clear = rule.clear.resolve(usage.limit)
    if trip is None or clear is None:
        return False
    if value >= trip:
        return True
    if was_tripped and value >= clear:
        return True
    return False
