"""End the request, not the process.

Admission reserves what a request is expected to use; an estimate can still be wrong (a body far
larger than any before, a loop that does not stop). Then the kernel OOM-kills the whole worker,
and every request in it is lost, including the ones well within their budget. The enforcer
watches the cgroup while admitted requests run, in two steps:

- when the requests that overran their reservation have eaten the budget (the room to the
  threshold is less than what the others still reserve: usage will pass the threshold as their
  charges arrive), it ends the overrunners, most first, until the budget would balance again.
  Within their reservations requests are left alone: the budget allowed them;
- within two bands of the OOM limit, it ends overrunners (only) until the room would be back at two
  bands: one growing 1 MiB/ms with no await crosses a band in ~25 ms (adversarial review D10);
- within ``band`` of the OOM limit, it also ends requests within their reservations, the largest
  first, until the room would be back above the band plus a buffer: the process must live.

What an ended request holds is counted as freed from then on (it unwinds within milliseconds), so
the next look does not end another for the same bytes: Ray's rule for killing workers, applied to
requests.

Ending a request raises :class:`~rtml_ebpf.errors.RequestMemoryExceeded` where it runs:
- in its own thread (WSGI, gRPC's pool) and in every helper thread working for it (``_follow``),
  at the next bytecode (``PyThreadState_SetAsyncExc``);
- in an asyncio request: a step running right now gets it in the loop's thread (its growth is
  seen as it runs), and one at rest in an await is interrupted on its loop at once (stepped.py).
The integrations turn it into a 503 (gRPC: RESOURCE_EXHAUSTED) when no response has started.
The honest limit: one C call that allocates everything at once (``bytearray(2 << 30)``) sees
the exception only when it returns, if the kernel has not killed the process by then.

The enforcer is one thread per process and sleeps while nothing is in flight. While requests
run, the kernel wakes it: after each look it sets the lowest usage at which its next look could
end something (the budget step: the threshold less what admitted requests still reserve; the
critical step: the effective limit less the band), and blocks on the programs' wake ring; the
charge that reaches that usage writes a record naming the charging thread and wakes it at once
(rtml_ebpf/ebpf/wake.py, rtml.h ``struct rtml_wake``). While usage stays at or past the level the
programs wake it at most every millisecond; once the room is back above the band the level rises
and the wakes stop; with nothing in flight the level is 0. A backstop look every ``BACKSTOP``
covers what the level cannot see (reservations that grew since, a limit written while idle).
Where no ring is to be had (the poll backend, a node agent's client, a forked child of the
loading process, a kernel without the hooks) it polls as before: every ``FAR_INTERVAL`` and, once
the room is within twice the band, every ``NEAR_INTERVAL``; a look is a few reads of the
kernel-fed mapping.
"""

from __future__ import annotations

import gc
import logging
import sys
import threading
import time
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from ..errors import ConfigError, RequestMemoryExceeded
from .follow import Account, clear_async_exception, raise_in_thread

if TYPE_CHECKING:
    from ..limiter import Limiter

log = logging.getLogger("rtml_ebpf")

DEFAULT_BAND = 0.1  # of the effective limit: at 500 MiB/s a 256 MiB cgroup's band is 50 ms of growth
MIN_BAND = 16 << 20  # the kernel charges in per-CPU batches and a request allocates between looks
BUFFER = 0.5  # stop ending once the room is back above band * (1 + BUFFER)
FAR_INTERVAL = 0.005
NEAR_INTERVAL = 0.001
GUESSES = ("learning", "cgroup")  # Ticket.basis of estimates that are not the request's route's own
COLLECT_DELAY = 0.05  # after an ended request finished: its handler has let go of the exception by then
LIMIT_REFRESH = 1.0  # seconds between reads of the effective limit (for a fractional band)
END_AGAIN_AFTER = 0.02  # seconds an ended request may still run, past the band, before it is ended again
BACKSTOP = 0.05  # seconds between looks while the kernel wakes the enforcer (tests make it long)
IDLE_SLICE = 0.05  # while waiting for the kernel: how often to ask whether anything is still in flight
WAKER_RETRY = 1.0  # seconds between attempts to get the kernel's wake for a cgroup that had none
# While the room is within the band: the GIL's switch interval. Woken by the kernel, the enforcer
# still needs the GIL to end a request; a request thread running Python holds it for the whole
# interval (5 ms by default, measured: P12's "hog" ending took 5 ms crossing -> raise).
NEAR_SWITCH_INTERVAL = 0.0005
# "Near" (the GIL's switch interval lowered, a look every NEAR_INTERVAL) from this many bands of
# the limit: a request growing 1 MiB/ms with no await crosses two bands before a look that
# waited 5 ms for each of its GIL takes (D10: 110 MiB in 120 ms between two looks).
NEAR_BANDS = 4


class Waker(Protocol):
    """The kernel's wake for one cgroup (rtml_ebpf.ebpf.wake.Waker)."""

    level_bytes: int

    def set_margin(self, margin: int | None) -> None: ...

    def wait(self, timeout: float) -> list[Any] | None: ...  # records ([] at the timeout); None: polled

    def close(self) -> None: ...


class Enforced(Protocol):
    """What the enforcer needs of an admitted request (``admission.Ticket``)."""

    route: str
    estimate: int | None
    basis: str  # how the estimate was reached: "learning" and "cgroup" (another route's) are guesses
    account: Account
    stepped: bool
    ident: int  # Python ident of the request's own thread, 0 when none (asyncio)
    stepping: int  # asyncio: ident of the loop's thread while one of its steps runs, else 0
    outside: bool  # WSGI: its thread runs the server's code now (the app returned), not the app's
    finished: bool
    ended: bool

    def grown(self) -> int: ...


@dataclass(frozen=True)
class Ending:
    """One request ended, for the log and the statistics."""

    route: str
    grown_bytes: int
    estimate_bytes: int | None
    limit_room_bytes: int
    time: float


def slack(estimate: int | None) -> int:
    """How far past its reservation a request may go before it counts as overrunning: estimates
    are quantiles of noisy measurements, and a request a little over its own is not the
    surprise the enforcer is for."""
    return max(1 << 20, (estimate or 0) // 4)


def check_band(band: object) -> float | int:
    if isinstance(band, bool) or not isinstance(band, (int, float)):
        raise ConfigError(f"enforce_band={band!r}: pass a fraction of the limit in (0, 0.5] or bytes (int > 0)")
    if isinstance(band, float) and not 0 < band <= 0.5:
        raise ConfigError(f"enforce_band={band!r}: a fraction of the limit must be in (0, 0.5], e.g. 0.1")
    if isinstance(band, int) and band <= 0:
        raise ConfigError(f"enforce_band={band!r}: bytes must be > 0")
    return band


def end(ticket: Enforced) -> bool:
    """Raise in every thread working for ``ticket`` now, and mark it so that its next step, and
    any work it hands to a thread, ends too. False when it finished or was ended already."""
    acc = ticket.account
    with acc.lock:
        if ticket.finished or ticket.ended:
            return False
        ticket.ended = acc.ended = True
        _raise_in_its_threads(ticket)
    return True


def end_again(ticket: Enforced) -> bool:
    """Raise again in the threads of a request ended before that still runs: the exception was
    swallowed on its way (an ``except Exception`` in the request's code, or in a library call it
    landed in: the Limiter's own never-raising checks catch everything). False once finished."""
    acc = ticket.account
    with acc.lock:
        if ticket.finished:
            return False
        _raise_in_its_threads(ticket)
    return True


def _raise_in_its_threads(ticket: Enforced) -> None:
    """RequestMemoryExceeded in the request's thread (or the one stepping its coroutine) and in
    every helper working for it. Called under the account's lock."""
    targets = [ticket.stepping] if ticket.stepped else [] if ticket.outside else [ticket.ident]
    targets += [ident for ident, _ in ticket.account.running.values()]
    for ident in targets:
        if ident:
            raise_in_thread(ident, RequestMemoryExceeded)
    wake = ticket.account.wake
    if ticket.stepped and not ticket.stepping and wake is not None and not ticket.account.running:
        # At rest in an await: what it holds is freed only once it unwinds, so now, not at its next
        # step. Not while a helper thread works for it (asyncio.to_thread): the exception is that
        # thread's, and cancelling the awaiting task would finish the request under it, so the
        # enforcer would stop raising there again (P12's to_thread p99 went from 4.7 to 24-46 ms).
        wake()


def finished(ticket: Enforced, own_thread: bool) -> None:
    """The request is over: the enforcer leaves it alone from now on. On its own thread, an
    exception raised there a moment before and not fired yet is dropped: it belongs to the
    request, not to whatever the server runs next."""
    acc = ticket.account
    with acc.lock:
        ticket.finished = True
        ended = ticket.ended
    if ended and own_thread:
        clear_async_exception(threading.get_ident())


class Enforcer:
    def __init__(self, band: float | int = DEFAULT_BAND) -> None:
        self.band = check_band(band)
        self.ended_total = 0
        self.recent: list[Ending] = []  # the last few, newest last
        self._limit: int | None = None
        self._limit_read = 0.0
        self._thread: threading.Thread | None = None
        self._active = threading.Event()
        self._collect_at = 0.0  # when to collect the garbage of ended requests (0: nothing to collect)
        self.wake_margin: int | None = None  # bytes of growth before the next look could end something
        self.woken = 0  # looks the kernel's wake started
        self.wake_tids: list[int] = []  # the charging threads the last few wake records named
        self._waker: Waker | None = None
        self._waker_cgroup = 0
        self._waker_tried = -WAKER_RETRY
        self._charging: Collection[int] = ()  # threads the last wake records named
        self._switch_was: float | None = None  # the switch interval before we lowered it (None: not lowered)
        self._ended_at: dict[int, float] = {}  # id of an ended, unfinished ticket -> when it was (last) ended

    def collect_soon(self) -> None:
        """An ended request has finished. What it held is often kept alive by its exception's
        traceback (frames and their locals in a reference cycle: a framework that logs the
        exception, or keeps it on its error response, makes one), so it would stay charged until
        the garbage collector happens to run, which an idle process may never do. Collect it off
        the request path, a moment later: the request's own handler may still hold the exception."""
        self._collect_at = time.monotonic() + COLLECT_DELAY
        self.wake()

    def band_bytes(self, limit: int | None) -> int | None:
        if limit is None:
            return None
        if isinstance(self.band, float):
            return max(MIN_BAND, int(limit * self.band))
        return self.band

    def _effective_limit(self, lim: Limiter, now: float) -> int | None:
        if now - self._limit_read >= LIMIT_REFRESH:
            self._limit_read = now
            try:
                self._limit = lim.stats().limit_bytes
            except Exception:  # noqa: BLE001 - a limiter that cannot say: no band this round
                self._limit = None
        return self._limit

    def check(self, lim: Limiter, tickets: Iterable[Enforced], reserved: int = 0, now: float | None = None,
              charging: Collection[int] = ()) -> bool:
        """One look: end what must end. ``reserved``: bytes admitted requests reserved and have
        not charged yet, in the whole cgroup. ``charging``: native ids of the threads the
        kernel's wake named: among the overrunners, theirs end first. Returns whether the cgroup
        is near its threshold or its limit, so the caller looks again sooner; sets
        ``wake_margin``, the growth after which a look could end something (<= 0: now)."""
        now = time.monotonic() if now is None else now
        room, limit_room = lim.room()
        if room is not None:
            room -= reserved  # what is left once every reservation is charged
        band = self.band_bytes(self._effective_limit(lim, now))
        steps = [m for m in (room, None if limit_room is None or band is None else limit_room - 2 * band)
                 if m is not None]
        self.wake_margin = min(steps) if steps else None
        critical = limit_room is not None and band is not None and limit_room < band
        over = room is not None and room < 0
        near = critical or over or (room is not None and band is not None and room < band) or \
            (limit_room is not None and band is not None and limit_room < NEAR_BANDS * band)
        # Within two bands of the limit an overrunner still growing at ~1 MiB/ms (an 80 MiB surprise
        # on an 8 MiB estimate) reaches the band in 25 ms, sooner than a busy node wakes us at its
        # tail (D10): overrunners, and only they, are ended from here.
        closing = limit_room is not None and band is not None and limit_room < 2 * band
        if not critical and not over and not closing:
            return near
        live: list[tuple[int, int, bool, Enforced]] = []
        pending = 0  # held by requests ended already and still unwinding: freed soon
        running = set()
        for t in tickets:
            if t.finished:
                continue
            running.add(id(t))
            grown = max(0, t.grown())
            if t.ended:
                pending += grown
                at = self._ended_at.setdefault(id(t), now)
                if now - at >= END_AGAIN_AFTER and end_again(t):
                    self._ended_at[id(t)] = now  # still running past the band: its exception was swallowed
            elif grown > 0 and (critical or t.basis not in GUESSES):
                # Past the threshold only a request that overran an estimate of its own is ended:
                # one that runs on a guess (learning, or another route's figure) is being measured.
                overrun = grown - (t.estimate or 0) - slack(t.estimate)
                acc = t.account
                named = bool(charging) and (acc.owner in charging or any(tid in charging for tid in acc.running))
                live.append((overrun, grown, named and overrun > 0, t))
        if critical:
            assert band is not None and limit_room is not None
            need = int(band * (1 + BUFFER)) - limit_room - pending
        else:
            balance = -room if over and room is not None else 0  # the budget balances again
            clear = 2 * band - limit_room if closing and band is not None and limit_room is not None else 0
            need = max(balance, clear) - pending
        for key in [k for k in self._ended_at if k not in running]:
            del self._ended_at[key]  # finished: its id may be reused
        # An overrunner the kernel caught charging first: it is the one growing now.
        live.sort(key=lambda x: (x[2], x[0], x[1]), reverse=True)
        for overrun, grown, _, t in live:
            if need <= 0:
                break
            if overrun <= 0 and not critical:
                break  # within their reservations: the budget allowed them
            if end(t):
                self._ended_at[id(t)] = now
                self._record(Ending(t.route, grown, t.estimate, -1 if limit_room is None else limit_room, time.time()))
                need -= grown
        return True

    def _record(self, e: Ending) -> None:
        self.ended_total += 1
        self.recent = [*self.recent[-15:], e]
        est = "none (learning)" if e.estimate_bytes is None else f"{e.estimate_bytes / 2**20:.1f} MiB"
        log.warning("rtml-ebpf: ended request %s to keep the cgroup from the OOM killer: it held %.1f MiB "
                    "against an estimate of %s, with %.1f MiB left before the limit",
                    e.route, e.grown_bytes / 2**20, est, e.limit_room_bytes / 2**20)

    # -- the thread ----------------------------------------------------------------------------
    def wake(self) -> None:
        """Requests are in flight: look."""
        if not self._active.is_set():
            self._active.set()

    def event(self) -> threading.Event:
        """What :meth:`wake` sets (admission's fast path sets it itself: one call less per request)."""
        return self._active

    def ensure(self, source: Callable[[], tuple[Limiter | None, list[Enforced], int]]) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._loop, args=(source,), name="rtml-ebpf-enforcer",
                                            daemon=True)
            self._thread.start()

    def waker_for(self, lim: Limiter) -> Waker | None:
        """The kernel's wake for the limiter's cgroup: the limiter's backend's (``Limiter.waker``:
        this process's programs, or the node agent's forwarding), else this process's own
        programs if they watch the cgroup; None otherwise (the enforcer polls). Asked again at
        most every ``WAKER_RETRY`` while there is none."""
        cgid = lim.cgroup_id
        if self._waker is not None and self._waker_cgroup == cgid:
            return self._waker
        now = time.monotonic()
        if self._waker_cgroup == cgid and now - self._waker_tried < WAKER_RETRY:
            return None
        self.drop_waker()
        self._waker_cgroup, self._waker_tried = cgid, now
        make: Callable[[float], Waker | None] | None = getattr(lim, "waker", None)
        runtime = sys.modules.get("rtml_ebpf.ebpf.runtime")  # not loaded: no program of ours to wake us
        rt = runtime.Runtime.current() if runtime is not None else None
        try:
            if callable(make):
                self._waker = make(NEAR_INTERVAL)
            else:
                self._waker = rt.waker(cgid, NEAR_INTERVAL) if rt is not None else None
        except Exception as exc:  # noqa: BLE001 - no ring (an old object, no memory for it): poll
            log.debug("rtml-ebpf: enforcer polls, no kernel wake: %s", exc)
            self._waker = None
        return self._waker

    def drop_waker(self) -> None:
        if self._waker is not None:
            self._waker.close()
            self._waker = None

    def _near_switch(self, near: bool) -> None:
        """Lower the GIL's switch interval while near the band, so that the enforcer, once woken,
        gets the GIL within ``NEAR_SWITCH_INTERVAL`` of its wake; put it back after. Left alone
        when someone else changed it meanwhile."""
        if near and self._switch_was is None:
            now = sys.getswitchinterval()
            if now > NEAR_SWITCH_INTERVAL:
                self._switch_was = now
                sys.setswitchinterval(NEAR_SWITCH_INTERVAL)
        elif not near and self._switch_was is not None:
            if sys.getswitchinterval() == NEAR_SWITCH_INTERVAL:
                sys.setswitchinterval(self._switch_was)
            self._switch_was = None

    def _settle(self) -> None:
        """Nothing in flight: the programs need not wake us (level 0)."""
        self._near_switch(False)
        if self._waker is not None:
            try:
                self._waker.set_margin(None)
            except Exception:  # noqa: BLE001
                self.drop_waker()

    def _loop(self, source: Callable[[], tuple[Limiter | None, list[Enforced], int]]) -> None:
        while True:
            self._active.wait(None if not self._collect_at else max(0.0, self._collect_at - time.monotonic()))
            if self._collect_at and time.monotonic() >= self._collect_at:
                self._collect_at = 0.0
                gc.collect()
            lim, tickets, reserved = source()
            if lim is None or not tickets:
                self._settle()
                self._active.clear()
                lim, tickets, reserved = source()  # one more look: a request may have come in meanwhile
                if lim is None or not tickets:
                    continue
            try:
                near = self.check(lim, tickets, reserved, charging=self._charging)
                waker = self.waker_for(lim)
            except Exception as exc:  # noqa: BLE001 - the enforcer must outlive a bad reading
                log.debug("rtml-ebpf: enforcer look failed: %s", exc)
                near, waker = False, None
            self._charging = ()
            self._near_switch(near)
            if waker is None or not self._woken(waker, source, near):
                time.sleep(NEAR_INTERVAL if near else FAR_INTERVAL)

    def _woken(self, waker: Waker, source: Callable[[], tuple[Limiter | None, list[Enforced], int]],
               near: bool = False) -> bool:
        """Set the level and block on the kernel's wake until a record, the backstop, or nothing
        in flight. False: the wake could not be had this time (the caller polls)."""
        try:
            waker.set_margin(self.wake_margin)
            # At or past a step already: the programs wake us at most every millisecond while it
            # grows, and we look at least that often (as the poll did) while it unwinds. Near
            # the band too: a wake forwarded by the node agent on a busy node came 12 ms late at
            # p90 and 144 ms at p99 (2 cores, load 5-13), while a request grew 1 MiB a millisecond.
            deadline = time.monotonic() + (NEAR_INTERVAL if near or self.wake_margin is not None and
                                           self.wake_margin <= 0 else BACKSTOP)
            while (left := deadline - time.monotonic()) > 0:
                got = waker.wait(min(left, IDLE_SLICE))
                if got is None:
                    return True  # another enforcer reads the ring: that wait was our poll
                if got:
                    self.woken += 1
                    self._charging = {r.tid for r in got}
                    self.wake_tids = [*self.wake_tids[-15:], *(r.tid for r in got[-16:])][-16:]
                    return True
                if self._collect_at and time.monotonic() >= self._collect_at:
                    return True
                lim, tickets, _ = source()  # a cheap question, not a look: still anything in flight?
                if lim is None or not tickets:
                    return True
        except Exception as exc:  # noqa: BLE001 - the ring failed: poll from now on
            log.debug("rtml-ebpf: enforcer's kernel wake failed, polling: %s", exc)
            self.drop_waker()
            return False
        return True
