"""One admitted request: what it reserved, how far its charges have come (on its own thread,
its asyncio steps, and every helper thread working for it), and whether the enforcer ended it."""

from __future__ import annotations

from threading import get_ident

from ..backends.meter import RUSAGE, Meter
from .estimator import CostEstimator
from .follow import Account


class Ticket:
    """One admitted request: what it reserved, how far its charges have come (on its own thread,
    its asyncio steps, and every helper thread working for it), and whether it was ended."""

    __slots__ = ("route", "estimate", "basis", "size", "tid", "ident", "net0", "stepped", "net", "peak", "meter",
                 "account", "stepping", "finished", "ended", "pending", "refused",
                 "outside")

    def __init__(self, route: str, estimate: int | None, tid: int, net0: int, stepped: bool,
                 meter: Meter = RUSAGE, size: int | None = None, basis: str = "route") -> None:
        self.route = route
        self.meter = meter  # the one it began with: a default limiter swapped meanwhile must not mix sources
        self.estimate = estimate  # None: learning
        self.basis = basis  # how the estimate was reached (Estimate.basis)
        self.size = size  # the request's body bytes, when known
        self.tid = tid
        self.ident = get_ident() if tid else 0  # the Python ident of that thread
        self.net0 = net0
        self.stepped = stepped  # asyncio: net/peak are kept by run_async, not read from the thread
        self.net = 0  # bytes charged since admission (stepped mode)
        self.peak = 0
        self.account = Account(meter, tid)  # helper threads' charges
        self.stepping = 0  # asyncio: the loop thread's ident while a step of this request runs
        self.finished = False
        self.ended = False  # the enforcer ended it
        # Admitted alone or learning with its body still to come: it holds no slot and reserves
        # nothing until the body has arrived (a stalled upload must not shut everyone else out).
        self.pending = False
        self.refused = False  # its body grew past what the budget can hold: answered 503, not learned
        # WSGI: its app returned, and its thread runs the server's code (writing the answer) except
        # while the response iterable's next() runs the app's (wsgi._Finishing): the enforcer
        # raises in that thread only then, not into the server's own writes (a 500 and a traceback).
        self.outside = False

    def grown(self) -> int:
        """Bytes charged to this request and still held: its own thread or steps, and helpers."""
        if self.stepped:
            own = self.net
        elif self.tid == 0:
            own = 0  # admitted, not yet running on a thread (Admission.bind)
        else:
            now = self.meter.net_of(self.tid)
            own = 0 if now is None else now - self.net0
        return own + self.account.grown()

    def body_read(self, nbytes: int, estimator: CostEstimator) -> bool:
        """The body read so far has reached ``nbytes``: the reservation grows to what a request
        of that size is estimated to need (never shrinks). True when it grew."""
        if self.size is not None and nbytes <= self.size:
            return False
        self.size = nbytes
        guess = estimator.estimate_for(self.route, nbytes)
        if guess is not None and (self.estimate is None or guess.bytes > self.estimate):
            self.estimate, self.basis = guess.bytes, guess.basis
            return True
        return False
