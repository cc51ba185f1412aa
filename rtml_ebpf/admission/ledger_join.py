"""Joining the shared ledger from admission, and what admission does when it cannot.

A ledger that cannot be made or joined (no safe place, a full filesystem, all rows taken) is
said once per reason, at error level, naming what happens instead: this process budgets alone
(its own reservations, not its sibling workers'), which still beats the door check alone. It
is tried again every RETRY_INTERVAL, and its return is said too.
"""

from __future__ import annotations

import logging
import time

from ..errors import ConfigError
from .ledger import Ledger
from .ledger_fast import Others

log = logging.getLogger("rtml_ebpf")

RETRY_INTERVAL = 30.0


class SharedLedger:
    """The ledger of one cgroup for an Admission; callers serialise (Admission holds its lock)."""

    def __init__(self) -> None:
        self.ledger: Ledger | None = None
        self.joined = 0  # the cgroup id whose ledger is open (0: none): the request path's test before get()
        self._cgid = 0
        self._retry_at = 0.0
        self._error = ""

    def get(self, cgid: int) -> Ledger | None:
        if self.ledger is not None and self._cgid == cgid:
            return self.ledger
        if time.monotonic() < self._retry_at and self._cgid == cgid:
            return None
        self.close()
        self._cgid = cgid
        ledger = Ledger(cgid)
        try:
            ledger.open()
        except (ConfigError, OSError) as exc:
            self.failed(exc)
            return None
        if self._error:
            log.warning("rtml-ebpf: the shared admission budget is back (%s)", ledger.path)
            self._error = ""
        self.ledger, self.joined = ledger, cgid
        return ledger

    def lock(self, cgid: int) -> Ledger | None:
        """The ledger, locked for a decision, or None (budget alone)."""
        ledger = self.get(cgid)
        if ledger is None:
            return None
        try:
            ledger.lock()  # a forked worker joins here: that may fail as opening does
        except (ConfigError, OSError) as exc:
            self.failed(exc)
            return None
        return ledger

    def sums(self, ledger: Ledger | None, claim: tuple[int, int, int, int, int] | None) -> Others:
        """The ledger's sums after ``claim`` (None: a look without one); zeros when this process
        budgets alone. Joining it after a fork may fail as opening does: then alone, said once."""
        if ledger is None:
            return (0, 0, 0, 0, 0)
        try:
            return ledger.look() if claim is None else ledger.claim(*claim)
        except (ConfigError, OSError) as exc:
            self.failed(exc)
            return (0, 0, 0, 0, 0)

    def failed(self, exc: BaseException) -> None:
        self.close()
        self._retry_at = time.monotonic() + RETRY_INTERVAL
        if str(exc) != self._error:
            self._error = str(exc)
            log.error("rtml-ebpf: the shared admission budget is unavailable (%s); this process budgets alone "
                      "(its own reservations only, not its sibling workers'), trying again every %g s",
                      exc, RETRY_INTERVAL)

    def close(self) -> None:
        self.joined = 0
        if self.ledger is not None:
            self.ledger.close()
            self.ledger = None
