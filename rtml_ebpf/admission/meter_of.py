"""The limiter's per-thread meter, asked once per backend rather than once per request."""

from __future__ import annotations

import logging
import sys

from ..backends.meter import RUSAGE, Meter
from ..limiter import Limiter

log = logging.getLogger("rtml_ebpf")
_warned_greenlets = False


def greenlets() -> bool:
    """gevent has patched threading (``gunicorn -k gevent``, ``monkey.patch_all()``): requests
    are greenlets sharing one OS thread, which a per-thread meter cannot tell apart."""
    monkey = sys.modules.get("gevent.monkey")
    try:
        return monkey is not None and bool(monkey.is_module_patched("threading"))
    except Exception:  # noqa: BLE001 - an unknown gevent: assume not
        return False


def _warn_greenlets() -> None:
    global _warned_greenlets
    if _warned_greenlets or not greenlets():
        return
    _warned_greenlets = True
    log.warning("rtml-ebpf: admission under gevent: requests are greenlets sharing one thread, so each one's "
                "measured cost includes what the others allocated meanwhile (learned costs run high, more is "
                "refused, and the enforcer may end the wrong request). Declare the costs (route_costs=, "
                "request_bytes=, cost_per_byte=) and pass enforce=False, or use admission=False (the check at "
                "the door), or a threaded worker (gunicorn -k gthread); see docs/admission.md")


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
        _warn_greenlets()  # here: once per backend, after the server has patched (in its worker)
        return meter
