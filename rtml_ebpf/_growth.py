"""Growth rate and time to the limit, from successive kernel readings of one cgroup.

The rate is the least-squares slope of the readings of the last WINDOW_S seconds (the page
counter moves in per-CPU batches of 64 pages: a slope over many readings smooths those steps,
a difference of two would not). Readings come from the limiter's monitor (every 50 ms where it
runs) and from every stats() call; closer than MIN_SPACING_S to the previous one they are
skipped.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable

WINDOW_S = 1.0
MIN_SPACING_S = 0.04
MIN_SAMPLES = 4


class Growth:
    def __init__(self, window_s: float = WINDOW_S) -> None:
        self.window_ns = int(window_s * 1e9)
        self._samples: deque[tuple[int, int]] = deque()  # (CLOCK_MONOTONIC ns, bytes)
        self._lock = threading.Lock()

    def add(self, t_ns: int, used: int) -> None:
        with self._lock:
            s = self._samples
            if s and t_ns - s[-1][0] < MIN_SPACING_S * 1e9:
                return
            s.append((t_ns, used))
            while s and t_ns - s[0][0] > self.window_ns:
                s.popleft()

    def rate(self, now_ns: int) -> float | None:
        """Bytes per second over the window, or None without enough recent readings."""
        with self._lock:
            pts = [(t, u) for t, u in self._samples if now_ns - t <= self.window_ns * 1.5]
        if len(pts) < MIN_SAMPLES or pts[-1][0] - pts[0][0] < self.window_ns / 2:
            return None
        n = len(pts)
        mt = sum(t for t, _ in pts) / n
        mu = sum(u for _, u in pts) / n
        var = sum((t - mt) ** 2 for t, _ in pts)
        if var == 0:
            return None
        slope_per_ns = sum((t - mt) * (u - mu) for t, u in pts) / var
        return slope_per_ns * 1e9


def seconds_to(room: int | None, rate: float | None, *, min_rate: float = 1.0) -> float | None:
    """Seconds until ``room`` bytes are used at ``rate`` bytes/s; None when not growing (below
    ``min_rate``), unlimited, or already past."""
    if room is None or rate is None or rate < min_rate:
        return None
    return max(0.0, room / rate)


class RateEwma:
    """A lighter estimator for many cgroups at once (the agent's /metrics): the rate between
    successive readings, smoothed exponentially with time constant ``tau_s``. O(1) per reading."""

    __slots__ = ("tau_ns", "t_ns", "used", "rate")

    def __init__(self, tau_s: float = 1.0) -> None:
        self.tau_ns = tau_s * 1e9
        self.t_ns = 0
        self.used = 0
        self.rate: float | None = None

    def add(self, t_ns: int, used: int) -> None:
        if self.t_ns:
            dt = t_ns - self.t_ns
            if dt <= 0:
                return
            inst = (used - self.used) * 1e9 / dt
            a = min(1.0, dt / self.tau_ns)
            self.rate = inst if self.rate is None else self.rate + a * (inst - self.rate)
        self.t_ns, self.used = t_ns, used


GROWTH_SAMPLE_INTERVAL = 0.1  # the monitor's readings for stats().growth_bytes_per_s
AHEAD_SAMPLE_INTERVAL = 0.05  # with trip_ahead_ms: every look of the monitor
AHEAD_CLEAR_FACTOR = 1.5  # a trip-ahead clears when the limit is this many times trip_ahead_ms away


class Sampler:
    """A Limiter's growth readings (from the monitor) and, with ``trip_ahead_ms``, the
    trip-ahead flag the hot check reads beside the verdict (``ahead[0]``)."""

    __slots__ = ("growth", "ahead", "ahead_ms", "_next")

    def __init__(self, ahead_ms: float | None) -> None:
        self.growth = Growth()
        self.ahead: bytearray | None = None if ahead_ms is None else bytearray(1)
        self.ahead_ms = ahead_ms or 0.0
        self._next = 0.0

    def sample(self, read: Callable[[], tuple[int, int | None]]) -> None:
        """One reading, ``read() -> (used bytes, bytes before the limit)``, every
        GROWTH_SAMPLE_INTERVAL (no syscall on the kernel-fed backends; a cached file read on
        the poll backend). A failed reading only thins the window."""
        now = time.monotonic()
        if now < self._next:
            return
        self._next = now + (GROWTH_SAMPLE_INTERVAL if self.ahead is None else AHEAD_SAMPLE_INTERVAL)
        try:
            used, room = read()
        except Exception:  # noqa: BLE001
            return
        self.growth.add(time.monotonic_ns(), used)
        if self.ahead is not None:
            self.judge(room)

    def judge(self, room: int | None) -> None:
        """Set or clear the trip-ahead flag from the rate and the room left before the limit."""
        assert self.ahead is not None
        left = seconds_to(room, self.growth.rate(time.monotonic_ns()))
        if left is None:
            self.ahead[0] = 0
        elif left * 1000 <= self.ahead_ms:
            self.ahead[0] = 1
        elif left * 1000 > self.ahead_ms * AHEAD_CLEAR_FACTOR:
            self.ahead[0] = 0
