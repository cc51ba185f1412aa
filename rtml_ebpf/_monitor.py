"""The monitor: one daemon thread per process that looks at limiters with relief, callbacks
or upkeep every MONITOR_INTERVAL, and logs one line per level transition.

It holds limiters weakly, so it never keeps one alive; the hot path never waits on it. A
forked child (gunicorn --preload, multiprocessing) starts its own thread for the limiters it
inherited: threads do not survive fork.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING

from .levels import Level

if TYPE_CHECKING:
    from .limiter import Limiter

log = logging.getLogger("rtml_ebpf")

MONITOR_INTERVAL = 0.05  # seconds between the monitor thread's looks at each limiter
FAILURE_LOG_INTERVAL = 60.0  # after a limiter's first failure (logged with its traceback): one line a minute
MiB = 1 << 20


class Monitor:
    def __init__(self) -> None:
        self._limiters: weakref.WeakSet[Limiter] = weakref.WeakSet()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._periodic: dict[object, list[float]] = {}  # fn -> [interval, last run]
        # limiter -> [time of the last line logged, failures since]: a broken limiter (its cgroup
        # removed) fails on every look, 20 times a second, for as long as it lives
        self._failures: weakref.WeakKeyDictionary[Limiter, list[float]] = weakref.WeakKeyDictionary()

    def every(self, interval: float, fn: Callable[[], object]) -> None:
        """Run ``fn`` from the monitor thread every ``interval`` seconds (once per fn)."""
        with self._lock:
            self._periodic.setdefault(fn, [interval, time.monotonic()])
            self._start_locked()

    def add(self, lim: Limiter) -> None:
        with self._lock:
            self._limiters.add(lim)
            self._start_locked()

    def _start_locked(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._run, name="rtml-ebpf-monitor", daemon=True)
            self._thread.start()

    def after_fork_in_child(self) -> None:
        self._lock = threading.Lock()
        self._thread = None
        if len(self._limiters) or self._periodic:
            with self._lock:
                self._start_locked()

    def _run(self) -> None:
        while True:
            time.sleep(MONITOR_INTERVAL)
            for lim in list(self._limiters):
                try:
                    lim._observe()
                except Exception as exc:  # noqa: BLE001 - keep watching the others
                    self._failed(lim, exc)
            now = time.monotonic()
            for fn, timing in list(self._periodic.items()):
                if now - timing[1] >= timing[0]:
                    timing[1] = now
                    try:
                        fn()  # type: ignore[operator]
                    except Exception:  # noqa: BLE001
                        log.exception("rtml-ebpf: periodic task %r failed", fn)

    def _failed(self, lim: Limiter, exc: Exception) -> None:
        """The first failure of a limiter with its traceback, then at most one line a minute."""
        now = time.monotonic()
        seen = self._failures.get(lim)
        if seen is None:
            self._failures[lim] = [now, 0]
            log.exception("rtml-ebpf: monitor failed on %r (further failures of this limiter: one line a "
                          "minute)", lim)
            return
        seen[1] += 1
        if now - seen[0] >= FAILURE_LOG_INTERVAL:
            log.error("rtml-ebpf: monitor still failing on %r: %d times in the last %.0f s, last: %s: %s", lim,
                      int(seen[1]), now - seen[0], type(exc).__name__, exc)
            seen[0], seen[1] = now, 0


_MONITOR = Monitor()


def monitor() -> Monitor:
    return _MONITOR


os.register_at_fork(after_in_child=lambda: _MONITOR.after_fork_in_child())


def log_transition(lim: Limiter, prev: Level, lvl: Level) -> None:
    """One line per level change: what, where, how full, and why."""
    try:
        s = lim.stats()
    except Exception as exc:  # noqa: BLE001 - a broken reading must not stop the monitor
        log.warning("rtml-ebpf: memory level %s -> %s in %s (no reading: %s)", prev.name, lvl.name,
                    lim.cgroup.directory, exc)
        return
    value = s.working_set_bytes if s.metric == "working_set" else s.usage_bytes
    limit = f"{s.limit_bytes / MiB:.0f} MiB" if s.limit_bytes is not None else "unlimited"
    level_threshold = s.threshold_bytes if lvl is not Level.SOFT else s.soft_threshold_bytes
    cause = {Level.HARD: "hard threshold reached", Level.SOFT: "soft threshold reached",
             Level.OK: "back below the clear point"}[lvl]
    if lvl is Level.HARD and s.tripped_ahead and (s.headroom_bytes is None or s.headroom_bytes > 0):
        cause = (f"the limit is {s.seconds_to_limit or 0:.2f} s away at {(s.growth_bytes_per_s or 0) / MiB:.0f} "
                 f"MiB/s (trip_ahead_ms={lim.trip_ahead_ms:g})")
    log.warning(
        "rtml-ebpf: memory level %s -> %s in %s: %s %.1f MiB of %s (threshold %s); %s",
        prev.name, lvl.name, s.cgroup_dir, s.metric.replace("_", " "), value / MiB, limit,
        f"{level_threshold / MiB:.1f} MiB" if level_threshold is not None else "n/a", cause,
    )
