"""Admission by memory budget: let a request in only if what it will allocate fits.

A check at the door is not enough under concurrency: 32 threads of a gthread server can all
pass ``is_mem_limit_reached()`` in the same millisecond, then allocate together. Admission
keeps a budget instead. Each request reserves its estimated cost (learned per route from
what the kernel charged to past requests, see ``rtml_ebpf.backends.meter`` and ``estimator``); a request is
admitted only if its estimate plus every reservation not yet charged fits in the headroom to
the threshold. Reservations are shared by all processes of the cgroup (``ledger``), shrink
as the request's own charges arrive (they are then in the kernel's usage), and are released
when it ends.

Rules, in order:
  1. the limiter's verdict is tripped: refuse (the door check);
  2. a route this process has not learned yet reserves the largest estimate any process of
     the cgroup knows (a fresh worker learns from its siblings' figures); only when no process
     knows anything is it *learning*. Either is admitted only if no other learning or guessed
     request is in flight in the cgroup (one at a time until it has ``min_samples``
     measurements; an ended request's cost counts as a lower bound, see fastpath.finish);
  3. admit if estimate + reserved (all processes) + a larger request's turn <= headroom to the
     threshold (turn.py: a large request refused although it could fit holds its room ~1 s);
  4. else admit only if nothing at all is in flight, no turn holds room against it, and the
     estimate fits below the limit (progress: one request larger than the margin still runs
     when it alone fits).

asyncio (ASGI, grpc.aio): requests share one thread, so the thread meter alone cannot tell
them apart. :meth:`Admission.run_async` drives the request's coroutine step by step and
charges what the thread's meter moved during each step to that request: between two awaits
only that request runs, so the attribution is exact for the request's own code (work it
hands to other tasks or threads is not charged to it).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..backends.meter import RUSAGE, Meter
from ..errors import ConfigError
from ..limiter import Limiter
from ..relief import set_mmap_threshold
from . import follow as _follow
from . import forks, turn
from .enforce import DEFAULT_BAND, GUESSES, Enforcer
from .estimator import CostEstimator, CostFunction, Estimate, RouteEstimate
from .fastpath import FastPath, Prepared
from .gate import BodyGate
from .ledger_join import SharedLedger
from .meter_of import MeterOf
from .publisher import Publisher
from .rule import decide, never_fits
from .shapes import Shapes
from .shared_routes import SharedRoutes
from .sums import blind as sums_blind
from .sums import cgroup_guess, own_totals, validate
from .ticket import Ticket

log = logging.getLogger("rtml_ebpf")
_fork_lock = threading.Lock()
os.register_at_fork(after_in_child=lambda: globals().__setitem__("_fork_lock", threading.Lock()))
_heap_released_in = 0  # pid of the process whose malloc was set to unmap large frees
RELEASE_HEAP_THRESHOLD = 128 << 10


def _release_heap() -> None:
    global _heap_released_in
    with _fork_lock:
        if _heap_released_in == forks.pid:
            return
        _heap_released_in = forks.pid
        if set_mmap_threshold(RELEASE_HEAP_THRESHOLD):
            log.info("rtml-ebpf: admission: malloc maps buffers of %d KiB and more, so freed request memory "
                     "leaves the cgroup at once (Admission(release_heap=False) to keep malloc as it is)",
                     RELEASE_HEAP_THRESHOLD >> 10)




@dataclass(frozen=True)
class AdmissionStats:
    admitted: int
    rejected_tripped: int
    rejected_budget: int
    rejected_learning: int
    inflight: int
    reserved_bytes: int  # this process's reservations not yet charged
    others_reserved_bytes: int  # every other process of the cgroup
    meter: str
    trims: int  # malloc_trim runs under budget pressure
    routes: tuple[RouteEstimate, ...]
    ended: int = 0  # requests the enforcer ended to keep the cgroup from the OOM killer
    followed: tuple[str, ...] = ()  # the entry points whose threads are charged to the request


class Admission(FastPath, BodyGate, Shapes):
    """Budget admission for one limiter's cgroup. Thread-safe, fork-safe, one per service.

    ``limiter``: None for the process default (rebuilt lazily, follows configure()).
    ``request_bytes``: declare every request's cost (no learning); ``route_costs``: per route
    (``{"POST /upload": 64 << 20}``). ``quantile``/``window``/``min_samples``: the estimator.
    ``share``: share reservations with the other processes of the cgroup (default True).
    ``release_heap``: on the first admission in each process, have glibc map allocations of
    128 KiB and more and unmap them when freed (``mallopt(M_MMAP_THRESHOLD)``), so a finished
    request's buffers leave the cgroup's usage at once instead of staying charged in malloc's
    arenas (measured: about 50 MiB held by 4 gthread workers, a third of the budget). Costs a
    page fault per page of each new large buffer. False leaves malloc as it is.
    ``cost_per_byte``: declare bytes of memory per body byte (a number, or per route);
    ``cost``: a function (route, body bytes or None) -> bytes, or None to learn.
    ``enforce``: end the requests that overran their reservation most when the room before the
    OOM killer falls below ``enforce_band`` (a fraction of the limit, or bytes; see _enforce).
    ``follow_threads``: charge a request for the threadpool work it hands off (see _follow).
    """

    def __init__(
        self,
        limiter: Limiter | None = None,
        *,
        request_bytes: int | None = None,
        route_costs: Mapping[str, int] | None = None,
        quantile: float = 0.9,
        window: int = 32,
        min_samples: int = 3,
        share: bool = True,
        release_heap: bool = True,
        cost_per_byte: float | Mapping[str, float] | None = None,
        cost: CostFunction | None = None,
        enforce: bool = True,
        enforce_band: float | int = DEFAULT_BAND,
        follow_threads: bool = True,
    ) -> None:
        validate(limiter, share=share, release_heap=release_heap, enforce=enforce, follow_threads=follow_threads)
        self._release_heap = release_heap
        self.estimator = CostEstimator(request_bytes=request_bytes, route_costs=route_costs, quantile=quantile,
                                       window=window, min_samples=min_samples, cost_per_byte=cost_per_byte,
                                       cost=cost)
        self.enforcer = Enforcer(enforce_band) if enforce else None
        self.followed = tuple(_follow.install()) if follow_threads else ()
        self._fixed = limiter
        self._share = share
        self._mu = threading.Lock()
        self._inflight: dict[int, Ticket] = {}
        self._shared = SharedLedger()
        self._routes = SharedRoutes()  # the cgroup's learned routes, for workers that come later
        self._pid = forks.pid
        self._meters = MeterOf()
        self._publisher = Publisher(self._publish, lambda: bool(self._inflight))
        self.admitted = self.rejected_tripped = self.rejected_budget = self.rejected_learning = 0
        self._others_reserved = 0
        self._widest = 0  # the most room before the OOM killer seen: what "never fits" is against
        self._why = threading.local()  # the calling thread's last refusal: why (see refusal())
        self._fast: Prepared | None = None  # what the common case's request path needs (fastpath.py)
        self._turn = turn.local_words()  # the fair turn's words when no ledger is shared (turn.py)
        if limiter is not None and share:
            with self._mu:
                self._shared.get(limiter.cgroup_id)  # at start: a ledger that cannot be made is said now

    # -- collaborators ----------------------------------------------------------------------
    def limiter(self) -> Limiter | None:
        if self._fixed is not None:
            return self._fixed
        from .. import _default

        return _default.current()

    def _meter(self, lim: Limiter) -> Meter:
        return self._meters.of(lim)

    def _after_fork(self) -> None:
        # A forked worker starts with no requests of its own: the parent's are the parent's.
        # Threads of a fresh worker arrive together: one resets, under the process-wide lock.
        with _fork_lock:
            if self._pid == forks.pid:
                return
            self._mu = threading.Lock()
            self._routes = SharedRoutes()  # its lock may have been held by a parent's thread
            self._inflight = {}
            self._publisher.after_fork()
            self._pid = forks.pid

    # -- the budget -------------------------------------------------------------------------
    def _admit_slow(self, route: str, size: int | None, stepped: bool, bind: bool, body: bool) -> Ticket | None:
        """try_admit (fastpath.py) for every case, step by step."""
        try:
            return self._try_admit(route, size, stepped, bind, body)
        except Exception as exc:  # noqa: BLE001 - admission must not take the service down
            return self._admit_failed(route, stepped, exc)

    def _admit_failed(self, route: str, stepped: bool, exc: Exception) -> Ticket | None:
        log.error("rtml-ebpf: admission failed (%s); falling back to the door check", exc)
        lim = self.limiter()
        if lim is not None and lim.is_mem_limit_reached():
            return None
        return Ticket(route, 0, forks.native_id(), 0, stepped)

    def _try_admit(self, route: str, size: int | None, stepped: bool, bind: bool, body: bool) -> Ticket | None:
        # No system call, no file lock (tests/root/test_admission_syscalls.py): the ledger is
        # claimed, then looked at (ledger_fast); its upkeep is the publisher thread's.
        if self._pid != forks.pid:
            self._after_fork()
        if self._release_heap and _heap_released_in != forks.pid:
            _release_heap()
        lim = self._fixed if self._fixed is not None else self.limiter()
        if lim is None:
            return Ticket(route, 0, forks.native_id(), 0, stepped)  # no limiter: fail open
        if lim.is_mem_limit_reached():
            self.rejected_tripped += 1
            return None
        guess: Estimate | None = self.estimator.estimate_for(route, size)
        if guess is None and self._share and self._routes.seed(lim.cgroup_id, self.estimator, route):
            guess = self.estimator.estimate_for(route, size)  # learned by the cgroup's processes
        estimate = None if guess is None else guess.bytes
        meter, est, shared = self._meters.of(lim), self.estimator, self._shared
        with self._mu:
            ledger = shared.ledger if shared.joined == lim.cgroup_id or not self._share else shared.get(lim.cgroup_id)
            own, own_inflight, own_learning = own_totals(self._inflight.values())
            own_largest, per_kib = est.largest_bytes, est.per_kib_bytes
            guessed = False
            if estimate is None:
                # Not learned here: a guess from the cgroup's figures, one at a time per route
                seen = shared.sums(ledger, None)
                estimate = cgroup_guess(est, size, seen[4], max(own_largest, seen[3]))
                guessed = estimate is not None
            # An unsized guess (another route's figure) counts as learning in the ledger
            # (sums.blind): one at a time in the cgroup, not one per process (N workers, N unknown
            # requests); a sized one, scaled by the cgroup's cost per KiB, one per route per process.
            blind = guessed and sums_blind(size)
            claim = (own + (estimate or 0), own_inflight + 1, own_learning + (estimate is None or blind), own_largest,
                     per_kib)
            others, others_inflight, others_learning, _, _ = shared.sums(ledger, claim)
            self._others_reserved = others
            fits, room = False, None
            words = ledger._rows if self._share and ledger is not None and ledger._rows is not None else self._turn
            if (blind and own_learning + others_learning > 0) or (
                    guessed and not blind and any(t.route == route and t.basis in GUESSES and not t.pending
                                                  for t in self._inflight.values())):
                why: str | None = "learning"
            else:
                room, limit_room = lim.room() if estimate is not None else (None, None)
                if limit_room is not None and limit_room > self._widest:
                    self._widest = limit_room
                held = 0 if estimate is None else turn.held(words, estimate)  # a larger one's turn: leave it room
                fits = estimate is not None and room is not None and estimate + own + others + held <= room
                why = None if fits else decide(estimate, own + others, room, limit_room, own_inflight + others_inflight,
                                               own_learning + others_learning,
                                               guessed or (guess is not None and guess.extrapolated),
                                               size is not None and never_fits(estimate, self._widest), held)
                if why == "budget" and estimate is not None and estimate < self._widest:
                    turn.take(words, estimate)  # it could fit: smaller ones leave it room for a while
                elif why is None and estimate is not None:
                    turn.served(words, estimate)
            if why is not None:
                if shared.ledger is not None:  # give the claim back
                    shared.sums(shared.ledger, (own, own_inflight, own_learning, own_largest, per_kib))
                if why == "learning":
                    self.rejected_learning += 1
                else:
                    self.rejected_budget += 1
                self._why.last = why
                self._publisher.refused(trim=why == "budget")
                return None
            basis = "learning" if estimate is None else "cgroup" if guessed or guess is None else guess.basis
            if stepped or not bind:
                ticket = Ticket(route, estimate, 0, 0, stepped, meter, size, basis)
            else:
                ticket = Ticket(route, estimate, forks.native_id(), meter.begin(), stepped, meter, size, basis)
                _follow.CURRENT.set(ticket.account)
            if body and (guessed or (not fits and (estimate is None or room is not None))):
                ticket.pending = True  # learning or alone: no slot until its body is in (body_done)
                shared.sums(shared.ledger, (own, own_inflight, own_learning, own_largest, per_kib))
            self._inflight[id(ticket)] = ticket
            self.admitted += 1
        if self.enforcer is not None:
            if self.__dict__.get("_enforcer_in") != forks.pid:  # started here once per process, then
                self._enforcer_in = forks.pid  # kept alive by the publisher (woken below, not before)
                self.enforcer.ensure(self._enforced)
            self.enforcer.wake()
        self._publisher.wake()
        if self._fast is None:
            self._prepare(lim)  # the next request of the common case takes fastpath.py's few steps
        return ticket

    def _enforced(self) -> tuple[Limiter | None, list[Any], int]:
        """What the enforcer looks at: the limiter, the requests in flight in this process, and
        the bytes reserved and not yet charged in the cgroup (every process, as last published)."""
        with self._mu:
            tickets = list(self._inflight.values())
            reserved = own_totals(self._inflight.values())[0] + self._others_reserved
        return self.limiter(), tickets, reserved

    # -- sharing the shrinking reservations -----------------------------------------------------
    def _publish(self) -> None:
        if self.enforcer is not None:  # its thread's liveness: looked at here, off the request path
            self.enforcer.ensure(self._enforced)
        ledger = self._shared.ledger
        if ledger is None or self._pid != forks.pid:
            return
        with self._mu:
            own, inflight, learning = own_totals(self._inflight.values())
            ledger.publish(own, inflight, learning, self.estimator.largest(), self.estimator.per_kib())
        self._routes.publish(ledger.cgroup_id)  # the costs measured here, for the cgroup's next workers
        with self._mu:
            try:
                ledger.upkeep()  # reaping dead processes' rows: off the request path
            except (ConfigError, OSError) as exc:
                self._shared.failed(exc)

    def stats(self) -> AdmissionStats:
        lim = self.limiter()
        meter = self._meter(lim) if lim is not None else RUSAGE
        with self._mu:
            own, inflight, _ = own_totals(self._inflight.values())
        return AdmissionStats(self.admitted, self.rejected_tripped, self.rejected_budget, self.rejected_learning,
                              inflight, own, self._others_reserved, meter.source, self._publisher.trims,
                              tuple(self.estimator.routes()),
                              self.enforcer.ended_total if self.enforcer is not None else 0, self.followed)

    def close(self) -> None:
        self._shared.close()
