"""asyncio requests share the event loop's thread, so the thread meter alone cannot tell them
apart: the request's coroutine is driven step by step, and what the thread's meter moved during
each step is charged to that request. Between two awaits only that request runs, so the
attribution is exact for the request's own code; its threadpool work is charged through the
account in its context (see follow.py).

While a step runs, the loop's thread is listed among the account's running threads, as a helper
thread is: the enforcer sees the step's growth as it happens (``Ticket.grown``) and raises in that
thread. An ``async def`` handler that builds 80 MiB with no await in between has one step; when
its growth was counted only as the step ended, the enforcer saw 0 for it until it held all of it,
and ended the requests at rest beside it instead (adversarial review D10: 3-5 OOM kills).

A request ended while at rest in an await (``asyncio.sleep``, a read) is interrupted on its loop
at once (``Account.wake``): its task is cancelled and the cancellation is turned into
RequestMemoryExceeded before the request's code sees it. Left to its next step it held its memory
up to its await's length (0.3 s in the flood above) while the enforcer counted it freed, and
spared the request growing beside it."""

from __future__ import annotations

import sys
import threading
from collections.abc import Coroutine, Generator
from typing import TYPE_CHECKING, Any

from ..backends.meter import Meter
from ..errors import RequestMemoryExceeded
from . import follow as _follow
from .forks import native_id
from .ticket import Ticket

if TYPE_CHECKING:  # asyncio is imported by the request's server, not by `import rtml_ebpf` (P4)
    import asyncio


class Stepped:
    """Drives a coroutine by hand, charging each step's meter movement to one ticket. The
    request's account is in the context while it runs (its threadpool work is charged to it),
    and an ended request gets RequestMemoryExceeded thrown in at its next step; a step running
    when it is ended gets it in the loop's thread (the enforcer raises there while ``stepping``)."""

    __slots__ = ("_coro", "_ticket", "_meter", "_task", "_resting", "_interrupting")

    def __init__(self, coro: Coroutine[Any, Any, Any], ticket: Ticket, meter: Meter) -> None:
        self._coro, self._ticket, self._meter = coro, ticket, meter
        self._task: asyncio.Task[Any] | None = None
        self._resting = False  # waiting at our yield: the request is at rest in an await
        self._interrupting = False  # we cancelled its task: the CancelledError is ours

    def _wake(self) -> None:
        """The enforcer's thread: interrupt the request's await on its loop."""
        task = self._task
        if task is not None:
            try:
                task.get_loop().call_soon_threadsafe(self._interrupt)
            except RuntimeError:
                pass  # the loop is closed: nothing runs there any more

    def _interrupt(self) -> None:
        """On the loop: cancel the task while it waits for us, so the ended request unwinds now."""
        task = self._task
        if self._resting and not self._interrupting and task is not None and not task.done():
            self._interrupting = True
            task.cancel()

    def __await__(self) -> Generator[Any, Any, Any]:
        coro, ticket, meter = self._coro, self._ticket, self._meter
        acc = ticket.account
        ident = threading.get_ident()
        tid = native_id()
        aio = sys.modules.get("asyncio")  # loaded wherever a coroutine is driven by asyncio
        try:
            self._task = aio.current_task() if aio is not None else None
        except RuntimeError:
            self._task = None  # not under asyncio (driven by hand): an ended request waits for its next step
        wake = acc.wake = self._wake if self._task is not None else None
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
                    # Our frame is in the exception's traceback: holding it here too makes a cycle
                    # that keeps the request's memory (its frames' locals) until a garbage collection.
                    error = send = None
                    raise
                _step(ticket, meter, net0, ident, tid if listed else 0)
                self._resting = True
                try:
                    send, error = (yield yielded), None
                except BaseException as exc:  # noqa: BLE001 - thrown into us: pass it to the coroutine
                    send, error = None, exc
                    if self._interrupting and aio is not None and isinstance(exc, aio.CancelledError):
                        error, thrown = RequestMemoryExceeded(), True  # our cancel: the request was ended
                        uncancel = getattr(self._task, "uncancel", None)  # 3.11+: keeps cancelling() true
                        if uncancel is not None:
                            uncancel()
                finally:
                    self._resting = False
                    self._interrupting = False
        finally:
            if acc.wake is wake:
                acc.wake = None
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
