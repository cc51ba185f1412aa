"""The limiter's per-thread meter, asked once per backend rather than once per request."""

from __future__ import annotations

from ..backends.meter import RUSAGE, Meter
from ..limiter import Limiter


class MeterOf:
    """``Limiter.thread_meter()`` takes the runtime's lock (and turns the kernel meter on) each
    time: admission asks it again only when the limiter's bound check changed, which it does
    whenever the backend does (the agent lost or back) and when the limiter closes. A limiter
    with no bound check (a backend whose check may raise) is asked every time."""

    __slots__ = ("_check", "_meter")

    def __init__(self) -> None:
        self._check: object = None
        self._meter: Meter = RUSAGE

    def of(self, lim: Limiter) -> Meter:
        check = lim.__dict__.get("is_mem_limit_reached")
        if check is not None and check is self._check:
            return self._meter
        meter = lim.thread_meter() or RUSAGE
        self._check, self._meter = check, meter
        return meter
