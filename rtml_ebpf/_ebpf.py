"""The eBPF backend: a Limiter's view of the shared loaded object (see loader.py)."""

from __future__ import annotations

import time

from ._backend import Snapshot
from ._cgroup import MemoryCgroup
from ._rules import Rule
from .loader import Runtime, SlotFlag


class EbpfFlag:
    """Holds the slot handle and the one-byte bool view the hot path indexes."""

    __slots__ = ("handle", "hot")

    def __init__(self, handle: SlotFlag) -> None:
        self.handle = handle
        self.hot = handle.view.cast("?")

    def __getitem__(self, index: int) -> bool:
        return bool(self.hot[0])


class EbpfBackend:
    name = "ebpf"

    def __init__(self, cgroup: MemoryCgroup, why: str) -> None:
        self.cgroup = cgroup
        self._runtime = Runtime.acquire()
        self._flags: list[EbpfFlag] = []
        self._last_upkeep = 0.0
        hooks = ", ".join(self._runtime.hooks)
        skipped = "; ".join(f"{k}: {v}" for k, v in self._runtime.skipped.items())
        self.reason = f"{why}: BPF programs attached ({hooks})" + (f"; skipped {skipped}" if skipped else "")

    @property
    def hooks(self) -> tuple[str, ...]:
        return self._runtime.hooks

    @property
    def runtime(self) -> Runtime:
        return self._runtime

    def add_rule(self, rule: Rule) -> EbpfFlag:
        flag = EbpfFlag(self._runtime.register(self.cgroup, rule))
        self._flags.append(flag)
        return flag

    def remove_rule(self, flag: object) -> None:
        if isinstance(flag, EbpfFlag) and flag in self._flags:
            self._flags.remove(flag)
            # Views are dropped, never released: a thread may still be indexing one, and a
            # released view would raise. The mapping goes when its last view is collected.
            self._runtime.unregister(flag.handle)

    def snapshot(self, full: bool = True) -> Snapshot:
        return self._runtime.snapshot(self.cgroup, full=full)

    @property
    def needs_upkeep(self) -> bool:
        return self._runtime is not None and self._runtime.needs_upkeep

    def maintain(self) -> None:
        now = time.monotonic()
        if now - self._last_upkeep >= self._runtime.MAINTAIN_INTERVAL:
            self._last_upkeep = now
            self._runtime.maintain(self.cgroup)

    def trips(self, flag: object) -> int:
        if not isinstance(flag, EbpfFlag):
            return 0
        return int(self._runtime.read_slot(flag.handle.slot).trips[flag.handle.rule])

    def close(self) -> None:
        for flag in list(self._flags):
            self.remove_rule(flag)
        if self._runtime is not None:
            self._runtime.release()
            self._runtime = None  # type: ignore[assignment]
