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

if TYPE_CHECKING:
    from .limiter import Level, Limiter

log = logging.getLogger("rtml_ebpf")

MONITOR_INTERVAL = 0.05  # seconds between the monitor thread's looks at each limiter
MiB = 1 << 20


class Monitor:
    def __init__(self) -> None:
        self._limiters: weakref.WeakSet[Limiter] = weakref.WeakSet()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._periodic: dict[object, list[float]] = {}  # fn -> [interval, last run]

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
                except Exception:  # noqa: BLE001 - keep watching the others
                    log.exception("rtml-ebpf: monitor failed on %r", lim)
            now = time.monotonic()
            for fn, timing in list(self._periodic.items()):
                if now - timing[1] >= timing[0]:
                    timing[1] = now
                    try:
                        fn()  # type: ignore[operator]
                    except Exception:  # noqa: BLE001
                        log.exception("rtml-ebpf: periodic task %r failed", fn)


_MONITOR = Monitor()


def monitor() -> Monitor:
    return _MONITOR


os.register_at_fork(after_in_child=lambda: _MONITOR.after_fork_in_child())


def log_transition(lim: Limiter, prev: Level, lvl: Level) -> None:
    """One line per level change: what, where, how full, and why."""
    from .limiter import Level

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
