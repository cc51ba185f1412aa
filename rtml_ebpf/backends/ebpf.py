"""The eBPF backend: a Limiter's view of the shared runtime (one rule = one Watch).

A removed cgroup: the programs follow a cgroup id, so they never answer for another cgroup
made at the same path; but the limit check and the upkeep read files by path. Once those find
the path is not our cgroup any more (removed, or removed and made again), the backend is *gone*:
its watches close with the fail answer in their verdict bytes (kept checks read it too), and
readings raise CgroupNotFound.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import cast

from .._cgroup import MemoryCgroup
from .._rules import Rule
from ..config import PAGE_SIZE
from ..ebpf import abi
from ..ebpf.runtime import Runtime, Watch
from ..ebpf.wake import Waker
from ..errors import CgroupNotFound, RtmlError
from ..snapshot import Snapshot
from .base import Flag
from .meter import EbpfThreadMeter

try:
    from .._hot import Room
except ImportError:  # built without a compiler: admission calls room() instead
    Room = None  # type: ignore[assignment,misc]


class EbpfBackend:
    name = "ebpf"
    hot_never_raises = True  # a one-byte view into the mapping, never released while watched

    def __init__(self, cgroup: MemoryCgroup, why: str) -> None:
        self.cgroup = cgroup
        self._runtime: Runtime | None = Runtime.acquire()
        self._watches: list[Watch] = []
        self._rules: dict[int, Rule] = {}
        self._last_upkeep = 0.0
        self.hooks = self._runtime.hooks
        skipped = "; ".join(f"{k}: {v}" for k, v in self._runtime.skipped.items())
        self.reason = f"{why}: BPF programs attached ({', '.join(self.hooks)})" + (
            f"; skipped {skipped}" if skipped else "")
        self.needs_upkeep = self._runtime.needs_upkeep
        self.gone: str | None = None
        self._fail_answer = False

    def set_fail_answer(self, fail_answer: bool) -> None:
        self._fail_answer = fail_answer

    def _check_gone(self) -> None:
        if self.gone is not None:
            raise CgroupNotFound(self.gone)

    @property
    def runtime(self) -> Runtime:
        rt = self._runtime
        if rt is None:
            raise RtmlError("this Limiter is closed: its eBPF backend was released")
        return rt

    def add_rule(self, rule: Rule) -> Watch:
        watch = self.runtime.register(self.cgroup, rule)
        self._watches.append(watch)
        self._rules[id(watch)] = rule
        return watch

    def remove_rule(self, flag: object, fail_answer: bool = False) -> None:
        if isinstance(flag, Watch) and flag in self._watches:
            self._watches.remove(flag)
            self._rules.pop(id(flag), None)
            # The view is not released: a kept check may still index it. The rule's byte now
            # holds the fail answer and its index stays out of use until the Watch is collected.
            flag.close(fail_answer)

    def hot(self, flag: object) -> Flag:
        assert isinstance(flag, Watch)
        return cast(Flag, flag.hot)

    def snapshot(self, flag: object, full: bool = True) -> Snapshot:
        assert isinstance(flag, Watch)
        self._check_gone()
        return self.runtime.snapshot(flag, full=full)

    def room(self, flag: object) -> tuple[int | None, int | None]:
        assert isinstance(flag, Watch)
        self._check_gone()
        return self.runtime.room(flag, self._rules[id(flag)])

    def room_reader(self, flag: object) -> Callable[[], tuple[int | None, int | None]] | None:
        """:meth:`room` of ``flag`` made once (``rtml_ebpf._hot.Room`` over the slot's words), for
        admission, which asks on every request; None where the extension was not built. It reads
        the slot whatever happens to the watch: the caller drops it once ``flag.closed`` (the
        watch removed, or the cgroup gone), when the slot may be lent to another cgroup."""
        if Room is None or not isinstance(flag, Watch) or flag.closed or self.gone is not None:
            return None
        slots = self.runtime._open_slots()
        if slots.words is None or slots.config_words is None:
            return None
        rule, base = self._rules[id(flag)], flag.slot * abi.SLOT_WORDS
        ppm, nbytes = rule.trip.ppm, rule.trip.nbytes
        return cast(Callable[[], "tuple[int | None, int | None]"], Room(
            slots.words, slots.config_words, base + abi.W_USAGE, base + abi.W_LIMIT, base + abi.W_HEADROOM,
            base + abi.W_HIGH, base + abi.W_HIGH_ROOM, base + abi.W_INACTIVE_DELTA, flag.slot * abi.CONFIG_WORDS + 1,
            rule.metric == "working_set", -1 if ppm is None else ppm, -1 if nbytes is None else nbytes,
            abi.UNLIMITED_PAGES, PAGE_SIZE))

    def maintain(self, flag: object) -> None:
        """From the monitor: where no memcg events are live, the upkeep (every 250 ms);
        where they are, a look at the limit files (every second) for limits changed while idle."""
        if not isinstance(flag, Watch) or self.gone is not None:
            return
        now = time.monotonic()
        try:
            if self.needs_upkeep and now - self._last_upkeep >= Runtime.MAINTAIN_INTERVAL:
                self._last_upkeep = now
                self.runtime.maintain(flag)
            elif not self.needs_upkeep and now - self._last_upkeep >= Runtime.LIMIT_CHECK_INTERVAL:
                self._last_upkeep = now
                self.runtime.check_limit(flag)
        except CgroupNotFound as exc:
            self.gone = str(exc)
            for watch in list(self._watches):
                watch.close(self._fail_answer)  # the byte answers the fail answer from now on

    def trips(self, flag: object) -> int:
        return self.runtime.trips(flag) if isinstance(flag, Watch) else 0

    def thread_meter(self) -> EbpfThreadMeter | None:
        rt = self._runtime
        if rt is None:
            return None
        rt.want_thread_meter()
        return rt.thread_meter

    def waker(self, flag: object, poll: float) -> Waker | None:
        """The enforcer's wake from this process's programs (rtml_ebpf/ebpf/wake.py)."""
        rt = self._runtime
        return rt.waker(flag.cgroup_id, poll) if rt is not None and isinstance(flag, Watch) else None

    def close(self) -> None:
        for watch in list(self._watches):
            self.remove_rule(watch)
        if self._runtime is not None:
            rt, self._runtime = self._runtime, None
            rt.release()

    def __del__(self) -> None:
        # Dropped without close() (its Limiter was dropped): give back the load's reference
        # without blocking (collection may run while the runtime lock is held). The watches
        # go on their own when nothing holds them.
        rt = getattr(self, "_runtime", None)
        if rt is not None:
            self._runtime = None
            try:
                rt.drop_ref()
            except Exception:  # noqa: BLE001 - interpreter shutdown
                pass
