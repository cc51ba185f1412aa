"""Relief: hand freed memory back when a limiter trips, so a service does not stay "full".

Without it a Python service that dropped its references can keep the memory:
cyclic garbage waits for the collector, and glibc keeps freed heap pages until
``malloc_trim``. It then rejects work forever (the complaint in Envoy #21923
and Dask #5840). A relief run is ``gc.collect()`` then ``malloc_trim(0)``,
never more often than ``min_interval`` seconds.
"""

from __future__ import annotations

import ctypes
import gc
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

from .config import PAGE_SIZE
from .errors import ConfigError

log = logging.getLogger("rtml_ebpf")



def _load_malloc_trim() -> Any:
    # glibc only: musl and others have no malloc_trim.
    try:
        libc = ctypes.CDLL("libc.so.6")  # the glibc soname; find_library would spawn ldconfig
        fn = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_size_t]
    fn.restype = ctypes.c_int
    return fn


_malloc_trim = _load_malloc_trim()
M_MMAP_THRESHOLD = -3  # glibc malloc.h


def set_mmap_threshold(nbytes: int) -> bool:
    """glibc ``mallopt(M_MMAP_THRESHOLD, nbytes)``: allocations of at least ``nbytes`` are mapped
    and unmapped on free, so the kernel stops charging them at once. Setting it also turns off
    glibc's dynamic threshold, which otherwise rises after the first large free and keeps freed
    request buffers in the (per-thread) arenas, still charged to the cgroup. False where the
    libc is not glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        fn = libc.mallopt
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_int]
    fn.restype = ctypes.c_int
    return bool(fn(M_MMAP_THRESHOLD, int(nbytes)))


def trim_heap() -> None:
    """glibc malloc_trim(0) where it exists."""
    if _malloc_trim is not None:
        _malloc_trim(0)


def resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE_SIZE


@dataclass
class ReliefStats:
    runs: int = 0
    skipped: int = 0  # wanted, but inside the rate limit
    bytes_returned: int = 0  # resident set shrink measured around the runs
    last_run_monotonic: float | None = None


class Relief:
    """Rate-limited ``gc.collect()`` + ``malloc_trim(0)``. One per process is enough: share it."""

    def __init__(self, *, min_interval: float = 5.0, collect: bool = True, trim: bool = True) -> None:
        if isinstance(min_interval, bool) or not isinstance(min_interval, (int, float)) or min_interval < 0:
            raise ConfigError(f"min_interval={min_interval!r}: pass seconds >= 0 (default 5.0)")
        self.min_interval = float(min_interval)
        self.collect = collect
        self.trim = trim and _malloc_trim is not None
        self.stats = ReliefStats()
        self._lock = threading.Lock()

    @property
    def trim_available(self) -> bool:
        return _malloc_trim is not None

    def run(self, reason: str = "", force: bool = False) -> int:
        """Run once unless inside the rate limit; returns the bytes the resident set shrank by."""
        if not self._lock.acquire(blocking=False):
            return 0
        try:
            now = time.monotonic()
            last = self.stats.last_run_monotonic
            if not force and last is not None and now - last < self.min_interval:
                self.stats.skipped += 1
                return 0
            before = resident_bytes()
            if self.collect:
                gc.collect()
            if self.trim and _malloc_trim is not None:
                _malloc_trim(0)
            freed = max(0, before - resident_bytes())
            self.stats.runs += 1
            self.stats.bytes_returned += freed
            self.stats.last_run_monotonic = time.monotonic()
            log.info("rtml-ebpf: relief%s returned %.1f MiB (gc.collect%s)", f" ({reason})" if reason else "",
                     freed / 2**20, " + malloc_trim" if self.trim else "")
            return freed
        finally:
            self._lock.release()


_default_relief: Relief | None = None


def default_relief() -> Relief:
    global _default_relief
    if _default_relief is None:
        _default_relief = Relief()
    return _default_relief
