"""The request path of admission for its common case, in as few steps as it can be: a request
whose estimate is known (declared or learned), run on the thread that asked, the cgroup's ledger
joined, the limiter on the eBPF backend, no body to wait for. A mixin of
:class:`~rtml_ebpf.admission.budget.Admission`, on its state.

Every other request, and this one whenever anything it relies on has changed, takes the full
path (``Admission._admit_slow``), which decides the same way step by step; the answers are the
same, only the number of calls differs (issue 19's overhead: about 10 µs per admitted request
before, most of it the Python glue between a dozen small objects). What is made once, in
:class:`Prepared`: the room as one C call over the slot's words that also claims the ledger
(``rtml_ebpf._hot.Room.fits``: claim, fence, sums, room, compare), the meter, the ledger's view
and row. Each request checks they still stand: the same process (fork), the same limiter and
check (another backend, a closed limiter), the watch open (a cgroup gone: its slot may be lent
to another cgroup), the same ledger and mapping (left, failed or relinked).
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING, Any

from . import follow as _follow
from . import forks
from .enforce import GUESSES, finished
from .ledger_layout import H_TURN
from .sums import own_totals
from .ticket import Ticket

if TYPE_CHECKING:
    from ..backends.meter import Meter
    from ..limiter import Limiter
    from .enforce import Enforcer
    from .estimator import CostEstimator
    from .ledger import Ledger
    from .ledger_join import SharedLedger
    from .publisher import Publisher
    from .shared_routes import SharedRoutes

log = logging.getLogger("rtml_ebpf")
_set_current = _follow.CURRENT.set  # the request's account, for the threads it hands work to


class Prepared:
    """What the common case needs, made once per limiter, ledger and process."""

    __slots__ = ("pid", "lim", "check", "watch", "room", "meter", "ledger", "rows", "row", "events")

    def __init__(self, lim: Limiter, check: Any, watch: Any, room: Any, meter: Meter, ledger: Ledger,
                 rows: memoryview, row: int, events: tuple[threading.Event, ...]) -> None:
        self.pid = forks.pid
        self.lim, self.check, self.watch, self.room, self.meter = lim, check, watch, room, meter
        self.ledger, self.rows, self.row = ledger, rows, row
        self.events = events  # what the enforcer's and the publisher's wake() set (their threads run)


class FastPath:
    # Admission's state, set by its constructor.
    _fixed: Limiter | None
    _mu: threading.Lock
    _inflight: dict[int, Ticket]
    _shared: SharedLedger
    _share: bool
    _publisher: Publisher
    _routes: SharedRoutes
    _widest: int
    _why: threading.local
    _others_reserved: int
    _fast: Prepared | None
    estimator: CostEstimator
    enforcer: Enforcer | None
    admitted: int
    rejected_tripped: int

    if TYPE_CHECKING:  # Admission's and BodyGate's (declared only: a body here would shadow theirs)
        def limiter(self) -> Limiter | None: ...
        def _meter(self, lim: Limiter) -> Meter: ...
        def _admit_slow(self, route: str, size: int | None, stepped: bool, bind: bool,
                        body: bool) -> Ticket | None: ...
        def _admit_failed(self, route: str, stepped: bool, exc: Exception) -> Ticket | None: ...
        def _publish_now(self) -> None: ...

    def try_admit(self, route: str, *, size: int | None = None, stepped: bool = False,
                  bind: bool = True, body: bool = False) -> Ticket | None:
        """A ticket when ``route`` may run now, None when it must be shed. Never raises.

        ``size``: the request's body bytes when known (``Content-Length``, a message's size): the
        estimate scales with it. ``stepped``: an asyncio request, metered by :meth:`run_async`.
        ``bind=False``: the request will run on another thread (a gRPC pool thread), which calls
        :meth:`bind`. A thread-bound ticket also marks this thread's context as working for the
        request, so work it hands to threads is charged to it (until :meth:`finish`).
        ``body``: the request's body is still to be read (the integration reports it with
        :meth:`body_read` and :meth:`body_done`): a request that could only run alone or learning
        is admitted *pending*, holding no slot until its body has arrived.
        """
        self._why.last = None
        fast = self._fast
        if fast is None or stepped or not bind or body:
            return self._admit_slow(route, size, stepped, bind, body)
        try:
            lim = self._fixed if self._fixed is not None else self.limiter()
            if (fast.pid != forks.pid or lim is not fast.lim or lim.is_mem_limit_reached is not fast.check
                    or fast.watch.closed):
                self._fast = None  # something it relied on changed: made again after a slow admission
                return self._admit_slow(route, size, stepped, bind, body)
            if fast.check():
                self.rejected_tripped += 1
                return None
            est = self.estimator
            fixed = est._fixed  # declared costs: estimate_for's first look, without its call
            guess = fixed.get(route, est._default) if fixed is not None else None
            if guess is None:
                guess = est.estimate_for(route, size)
            if guess is None:
                return self._admit_slow(route, size, stepped, bind, body)  # learning, or a guess
            estimate = guess[0]  # (bytes, basis): indexing a NamedTuple is cheaper than its names
            ticket = None
            with self._mu:
                # The ledger is left, failed or relinked by the publisher thread under this lock:
                # looked at here, where its old view cannot be released under us.
                if self._shared.ledger is not fast.ledger or fast.ledger._rows is not fast.rows:
                    self._fast = None  # made again after the next admission on the full path
                elif fast.rows[H_TURN] <= 0:  # no large request's turn is live (else the full path decides: turn.py)
                    inflight = self._inflight
                    own, n, learning = own_totals(inflight.values()) if inflight else (0, 0, 0)
                    # The claim, then the look (ledger_fast's order), then the room: one C call
                    got = fast.room.fits(fast.rows, fast.row, own, n, learning, est.largest_bytes,
                                         est.per_kib_bytes, estimate)
                    if got is not None:
                        self._others_reserved, limit_room = got
                        if limit_room is not None and limit_room > self._widest:
                            self._widest = limit_room
                        meter = fast.meter
                        ticket = Ticket(route, estimate, forks.native_id(), meter.begin(), False, meter, size,
                                        guess[1])
                        _set_current(ticket.account)
                        inflight[id(ticket)] = ticket
                        self.admitted += 1
            if ticket is None:
                return self._admit_slow(route, size, stepped, bind, body)  # the rule's other cases
            for event in fast.events:  # the enforcer and the publisher look while requests are in flight
                if not event.is_set():  # set only from idle, as their wake() does
                    event.set()
            return ticket
        except Exception as exc:  # noqa: BLE001 - admission must not take the service down
            return self._admit_failed(route, stepped, exc)

    def _prepare(self, lim: Limiter) -> None:
        """After an admission on the full path: make what the common case needs, where it can
        be had (the eBPF backend, the shared ledger joined, the extension built)."""
        ledger = self._shared.ledger
        if not self._share or ledger is None or ledger._rows is None or ledger._pid != forks.pid:
            return
        reader = lim.room_reader()
        if reader is None or not hasattr(reader.room, "fits"):
            return
        publisher = self._publisher.event()
        events = (publisher,) if self.enforcer is None else (self.enforcer.event(), publisher)
        self._fast = Prepared(lim, reader.check, reader.watch, reader.room, self._meter(lim), ledger,
                              ledger._rows, ledger._row, events)

    def finish(self, ticket: Ticket) -> int | None:
        """The request ended (answered, failed or cancelled): learn its cost, free its reservation.
        Returns the measured cost in bytes (its peak growth), None when it could not be measured."""
        cost: int | None = None
        acc = ticket.account
        try:
            own_thread = not ticket.stepped and ticket.tid == forks.native_id()
            finished(ticket, own_thread)  # the enforcer leaves it alone from now on
            ended = ticket.ended
            if own_thread:
                _set_current(None)
                _, peak = ticket.meter.read()
                cost = peak - ticket.net0 + acc.peak  # acc: what its helper threads held (an upper bound)
            elif ticket.stepped:
                cost = ticket.peak + acc.peak
            # else: finished on another thread than it ran on: nothing to learn
            if cost is not None and not ticket.refused:
                # Ended: stopped early, it needed at least what it held. Learned as a lower bound (it
                # only raises an estimate), else a route whose requests are always ended would stay
                # on the cgroup's guess for ever (issue 19, D6: held 44 MiB, estimate 9.7).
                if not ended:
                    self.estimator.observe(ticket.route, cost, ticket.size)
                    self._routes.note(ticket.route, cost, ticket.size)  # for the cgroup's next workers
                elif cost > (ticket.estimate or 0):
                    self.estimator.observe(ticket.route, cost, ticket.size, floor=True)
        except Exception as exc:  # noqa: BLE001 - RequestMemoryExceeded too: the request is over
            log.debug("rtml-ebpf: no cost measured for %s (%s)", ticket.route, exc)
        with self._mu:
            self._inflight.pop(id(ticket), None)
            if ticket.estimate is None or ticket.basis in GUESSES:
                self._publish_now()  # a learning slot: the next request may come at once
        if ticket.ended and self.enforcer is not None:
            self.enforcer.collect_soon()
        # The row is re-published by the publisher thread within PUBLISH_INTERVAL: until then
        # the other processes see this reservation still held (the safe side), and the request
        # path saves a publication.
        self._publisher.wake()
        return cost
