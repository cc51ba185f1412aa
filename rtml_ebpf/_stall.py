"""Is the cgroup stalling on memory? The share of the last second in which some task of the
cgroup waited on memory (PSI ``some``), read from ``memory.pressure`` at most every 100 ms.

The same figure a PSI trigger ``some 150000 1000000`` arms in the kernel (the node agent's,
agent/psi.py); an unprivileged process may not arm a trigger with a window under 2 s, so a
Limiter measures the totals' growth itself. Cheap between readings (a clock read and a
compare), never raises: no file (cgroup v1, no PSI) or a failed read answers "not stalling",
since stalling is a signal on top of the thresholds, not one that replaces them.
"""

from __future__ import annotations

import threading
import time
from collections import deque

from ._cgroup import MemoryCgroup, read_text
from ._psi import parse_pressure, pressure_file

STALL_WINDOW_NS = 1_000_000_000
STALL_SHARE = 0.15  # of the window: 150 ms stalled in a second (the agent's trigger)
READ_EVERY_NS = 100_000_000


class StallMeter:
    def __init__(self, cgroup: MemoryCgroup, *, share: float = STALL_SHARE) -> None:
        self._path = pressure_file(cgroup)
        self._share = share
        self._samples: deque[tuple[int, int]] = deque()  # (monotonic ns, some total us)
        self._read_ns = 0
        self._answer = False
        self._lock = threading.Lock()
        self.available = cgroup.version == 2

    def stalling(self) -> bool:
        now = time.monotonic_ns()
        if not self.available or now - self._read_ns < READ_EVERY_NS or not self._lock.acquire(blocking=False):
            return self._answer  # another thread is reading: its answer comes in a moment
        try:
            self._read_ns = now
            try:
                total = parse_pressure(read_text(self._path)).some_total_us
            except (OSError, ValueError):
                self._answer = False
                return False
            self._samples.append((now, total))
            while len(self._samples) > 2 and now - self._samples[1][0] >= STALL_WINDOW_NS:
                self._samples.popleft()  # keep one sample at or before the window's start
            t0, total0 = self._samples[0]
            span = now - t0
            self._answer = span > 0 and (total - total0) * 1000 / span >= self._share
            return self._answer
        finally:
            self._lock.release()
