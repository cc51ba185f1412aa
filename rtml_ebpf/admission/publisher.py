"""This process's ledger row kept current while its requests run, and freed heap handed back
under budget pressure: one thread, off the request path, asleep while nothing is in flight."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from ..relief import trim_heap

log = logging.getLogger("rtml_ebpf")

PUBLISH_INTERVAL = 0.005  # seconds between re-publications of shrinking reservations
TRIM_INTERVAL = 0.1  # at most this often per process: hand freed heap back under budget pressure


class Publisher:
    """``publish`` writes the row; ``busy`` says whether requests are in flight."""

    def __init__(self, publish: Callable[[], None], busy: Callable[[], bool]) -> None:
        self._publish, self._busy = publish, busy
        self._thread: threading.Thread | None = None
        self._wake = threading.Event()
        self.want_trim = False
        self._last_trim = 0.0
        self.trims = 0

    def after_fork(self) -> None:
        """A forked child has no thread of ours."""
        self._thread = None
        self._wake = threading.Event()

    def wake(self) -> None:
        # Set only from idle: a set() per request hands the GIL to another thread each time.
        if not self._wake.is_set():
            self._wake.set()
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="rtml-ebpf-admission", daemon=True)
            self._thread.start()

    def event(self) -> threading.Event:
        """What :meth:`wake` sets, for a caller that has seen the thread started (admission's fast
        path: one call less per request); a forked child has another."""
        return self._wake

    def refused(self, trim: bool) -> None:
        """A request was refused: run once even with nothing in flight, so a dead process's row
        that may be what refuses it is reaped (the ledger's upkeep is this thread's); ``trim``:
        budget pressure, hand freed heap back too (at most every TRIM_INTERVAL)."""
        if trim:
            self.want_trim = True
        self.wake()

    def _trim_if_wanted(self) -> None:
        """Budget pressure: a Python service keeps freed request memory in its malloc arenas
        (glibc raises its mmap threshold after the first large free), so the kernel still
        charges it and the budget stays short. Hand it back at most every TRIM_INTERVAL."""
        now = time.monotonic()
        if self.want_trim and now - self._last_trim >= TRIM_INTERVAL:
            self.want_trim = False
            self._last_trim = now
            trim_heap()
            self.trims += 1

    def _loop(self) -> None:
        # While requests are in flight, their reservations shrink as their charges arrive;
        # other processes read this row, so keep it current (every 5 ms) rather than only at
        # this process's next admission.
        while True:
            self._wake.wait()
            self._trim_if_wanted()
            if not self._busy():
                self._wake.clear()
                if not self._busy():
                    self._publish()
                    continue
            try:
                self._publish()
            except Exception as exc:  # noqa: BLE001 - keep publishing
                log.debug("rtml-ebpf: publish failed: %s", exc)
            time.sleep(PUBLISH_INTERVAL)
