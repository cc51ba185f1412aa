"""Admission once more for a request already admitted: its body grew as it was read, its body has
arrived (a pending request takes its slot). A request holds its slot until its app returns (work
after the response, such as Starlette's BackgroundTasks, is the request's). A mixin of
:class:`~rtml_ebpf.admission.budget.Admission`, on its state."""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING

from . import forks, turn
from .enforce import GUESSES
from .rule import decide, never_fits
from .sums import own_totals
from .ticket import Ticket

if TYPE_CHECKING:
    from ..limiter import Limiter
    from .estimator import CostEstimator
    from .ledger_join import SharedLedger
    from .publisher import Publisher

log = logging.getLogger("rtml_ebpf")


class BodyGate:
    """The request's body and response as admission sees them (see body.py for the wrappers)."""

    # Admission's state, set by its constructor.
    _fixed: Limiter | None
    _mu: threading.Lock
    _inflight: dict[int, Ticket]
    _shared: SharedLedger
    _pid: int
    _publisher: Publisher
    _widest: int
    _why: threading.local
    _share: bool
    _turn: turn.Words
    estimator: CostEstimator
    rejected_budget: int
    rejected_learning: int

    def limiter(self) -> Limiter | None:
        raise NotImplementedError

    def body_read(self, ticket: Ticket, nbytes: int) -> bool:
        """The body read so far has reached ``nbytes``: the reservation grows to what a request of
        that size is estimated to need (it never shrinks here), and the cost is learned against the
        size read. False: the grown reservation no longer fits (nor could it run alone), so the
        request must be refused before the app sees more of its body (``ticket.refused`` is set)."""
        if not ticket.body_read(nbytes, self.estimator) or ticket.estimate is None:
            return True
        try:
            return self._recheck(ticket, grown=True)
        except Exception as exc:  # noqa: BLE001 - a failed check admits, as try_admit does
            log.error("rtml-ebpf: admission failed (%s) while a body was read; letting it through", exc)
            return True

    def body_done(self, ticket: Ticket) -> bool:
        """The request's body has been read. A *pending* request (one that could only run alone or
        learning) takes its slot now; False: it cannot (``ticket.refused`` is set: answer 503)."""
        return self.take_slot(ticket)

    def take_slot(self, ticket: Ticket) -> bool:
        """A *pending* request takes its slot now: its body is in, its app starts the response
        without it, or its app grows past what the body read so far explains (body.py's watch).
        False: it cannot (``ticket.refused`` is set: answer 503, or end it)."""
        if not ticket.pending:
            return True
        try:
            return self._recheck(ticket, grown=False)
        except Exception as exc:  # noqa: BLE001
            log.error("rtml-ebpf: admission failed (%s) for a request waiting for its body; letting it through", exc)
            ticket.pending = False
            return True

    def _recheck(self, ticket: Ticket, grown: bool) -> bool:
        """The admission rule again for an admitted request whose reservation grew (``grown``) or
        whose body has arrived (pending): True when it may go on."""
        lim = self._fixed if self._fixed is not None else self.limiter()
        if lim is None or ticket.finished:
            return True
        est, shared = self.estimator, self._shared
        with self._mu:
            if not grown and (not ticket.pending or ticket.refused):
                return not ticket.refused  # another thread took its slot (or refused it) meanwhile
            if ticket.pending and grown:
                # Still waiting for its body: refused only when it could never fit even alone.
                why = "too_large" if never_fits(ticket.estimate, self._widest) else None
            else:
                ticket.pending = False
                own, own_inflight, own_learning = own_totals(self._inflight.values())
                mine = 0 if ticket.estimate is None else max(0, ticket.estimate - max(0, ticket.grown()))
                claim = (own, own_inflight, own_learning, est.largest_bytes, est.per_kib_bytes)
                others, others_inflight, others_learning, _, _ = shared.sums(shared.ledger, claim)
                room, limit_room = lim.room()
                if limit_room is not None and limit_room > self._widest:
                    self._widest = limit_room
                ledger = shared.ledger
                words = ledger._rows if self._share and ledger is not None and ledger._rows is not None else self._turn
                held = 0 if ticket.estimate is None else turn.held(words, ticket.estimate)  # a larger one's turn
                if ticket.estimate is None:
                    why = decide(None, 0, room, limit_room, 0, own_learning - 1 + others_learning)
                elif room is None or own + others + held <= room:
                    why = None
                else:
                    why = decide(mine, own - mine + others, room, limit_room, own_inflight - 1 + others_inflight, 0,
                                 ticket.basis in GUESSES, never_fits(ticket.estimate, self._widest), held)
            if why is None:
                return True
            ticket.pending, ticket.refused = True, True  # holds nothing from now on
            if why == "learning":
                self.rejected_learning += 1
            else:
                self.rejected_budget += 1
            self._why.last = why
            shared.sums(shared.ledger, (*own_totals(self._inflight.values()), est.largest_bytes, est.per_kib_bytes))
        self._publisher.refused(trim=True)
        return False

    def learning_retried(self) -> None:
        """The request this thread's admission just refused as "learning" is tried again (the ASGI
        middleware waits for the learning slot): not a rejection yet, so it is not counted twice."""
        with self._mu:
            self.rejected_learning -= 1

    def _publish_now(self) -> None:
        """This process's row, now (under ``_mu``; a claim on the mapping, no system call)."""
        if self._shared.ledger is not None and self._pid == forks.pid:
            est = self.estimator
            self._shared.sums(self._shared.ledger, (*own_totals(self._inflight.values()), est.largest_bytes,
                                                    est.per_kib_bytes))

    def refusal(self) -> str | None:
        """Why this thread's last :meth:`try_admit` refused: "learning", "budget", "too_large"
        (a declared size that could never fit: retrying will not help), None when it admitted."""
        return getattr(self._why, "last", None)
