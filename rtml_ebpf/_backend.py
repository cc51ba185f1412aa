"""What a backend hands the Limiter: a per-rule flag for the hot path and snapshots."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from ._rules import Rule


class Flag(Protocol):
    """``flag[0]`` is the hot-path answer: True while the rule is tripped."""

    def __getitem__(self, index: int) -> bool: ...


@dataclass(frozen=True)
class Snapshot:
    """One consistent reading of a watched cgroup, in bytes."""

    usage: int  # the cgroup's own usage (memory.current / usage_in_bytes)
    used: int  # usage as the tightest ancestor sees it (see _rules.effective_used)
    inactive_file: int
    limit: int | None
    limit_source: str | None
    headroom: int | None
    updated_ns: int  # CLOCK_MONOTONIC of the reading
    oom_kills: int
    faults: int | None = None  # ebpf only
    events: int | None = None  # ebpf only
    growth: dict[str, tuple[int, int]] = field(default_factory=dict)  # kind -> (charged, uncharged)

    @property
    def working_set(self) -> int:
        return max(0, self.used - self.inactive_file)


class Backend(Protocol):
    name: str
    reason: str

    def add_rule(self, rule: Rule) -> Flag: ...

    def remove_rule(self, flag: Flag) -> None: ...

    def snapshot(self, full: bool = True) -> Snapshot:
        """``full=False``: a cheap reading for pressure estimates (no extra file reads / syscalls)."""
        ...

    def trips(self, flag: Flag) -> int:
        """How many times the rule behind ``flag`` went from clear to tripped."""
        ...

    def close(self) -> None: ...
