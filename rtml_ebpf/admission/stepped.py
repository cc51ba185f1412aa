"""asyncio requests share the event loop's thread, so the thread meter alone cannot tell them
apart: the request's coroutine is driven step by step, and what the thread's meter moved during
each step is charged to that request. Between two awaits only that request runs, so the
attribution is exact for the request's own code; its threadpool work is charged through the
account in its context (see follow.py).

While a step runs, the loop's thread is listed among the account's running threads, as a helper
thread is: the enforcer sees the step's growth as it happens (``Ticket.grown``) and raises in that
thread. An ``async def`` handler that builds 80 MiB with no await in between has one step; when
its growth was counted only as the step ended, the enforcer saw 0 for it until it held all of it,
and ended the requests at rest beside it instead (adversarial review D10: 3-5 OOM kills)."""

from __future__ import annotations

import threading
from collections.abc import Coroutine, Generator
from typing import Any

from ..backends.meter import Meter
from ..errors import RequestMemoryExceeded
from . import follow as _follow
from .forks import native_id
from .ticket import Ticket


class Stepped:
    """Drives a coroutine by hand, charging each step's meter movement to one ticket. The
    request's account is in the context while it runs (its threadpool work is charged to it),
    and an ended request gets RequestMemoryExceeded thrown in at its next step; a step running
    when it is ended gets it in the loop's thread (the enforcer raises there while ``stepping``)."""

    __slots__ = ("_coro", "_ticket", "_meter")

    def __init__(self, coro: Coroutine[Any, Any, Any], ticket: Ticket, meter: Meter) -> None:
        self._coro, self._ticket, self._meter = coro, ticket, meter

    def __await__(self) -> Generator[Any, Any, Any]:
        coro, ticket, meter = self._coro, self._ticket, self._meter
        acc = ticket.account
        ident = threading.get_ident()
        tid = native_id()
        token = _follow.CURRENT.set(acc)
        send: Any = None
        error: BaseException | None = None
        thrown = False
        try:
            while True:
                meter.reset_peak()
                net0, _ = meter.read()
                with acc.lock:
                    if ticket.ended and not thrown and error is None:
                        error, thrown = RequestMemoryExceeded(), True
                    ticket.stepping = ident
                    listed = tid not in acc.running  # (a step inside another's: the outer one lists it)
                    if listed:
                        acc.running[tid] = (ident, net0)
                try:
                    yielded = coro.send(send) if error is None else coro.throw(error)
                except StopIteration as stop:
                    _step(ticket, meter, net0, ident, tid if listed else 0)
                    return stop.value
                except BaseException:
                    _step(ticket, meter, net0, ident, tid if listed else 0)
                    raise
                _step(ticket, meter, net0, ident, tid if listed else 0)
                try:
                    send, error = (yield yielded), None
                except BaseException as exc:  # noqa: BLE001 - thrown into us: pass it to the coroutine
                    send, error = None, exc
        finally:
            try:
                _follow.CURRENT.reset(token)
            except ValueError:
                pass  # closed from another context (collected): nothing of ours is set there


def _step(ticket: Ticket, meter: Meter, net0: int, ident: int, tid: int) -> None:
    acc = ticket.account
    net1, peak1 = meter.read()
    with acc.lock:
        ticket.stepping = 0
        ended = ticket.ended
        ticket.peak = max(ticket.peak, ticket.net + (peak1 - net0))
        ticket.net += net1 - net0  # with the thread's leaving running, under the lock: one change
        if tid:
            acc.running.pop(tid, None)
    if ended:
        _follow.clear_async_exception(ident)  # raised as the step ended: it is not the next task's
