"""One reading of a watched memory cgroup, in bytes: the value every layer passes around (the
cgroup files, the programs' slots, the backends, the Limiter's stats). Imports nothing of ours."""

from __future__ import annotations

from dataclasses import dataclass, field


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
