"""The Limiter: one memory cgroup, one threshold, one backend."""

from __future__ import annotations

import functools
import logging
import os
import random
import threading
from collections.abc import Callable
from types import TracebackType
from typing import TYPE_CHECKING, Any

from ._growth import Sampler
from ._hotcheck import hot_check
from ._monitor import log_transition, monitor
from ._readings import LimiterReadings
from ._rules import Rule
from ._settings import MAX_AHEAD_MS, parse_settings  # noqa: F401 - MAX_AHEAD_MS re-exported
from ._stats import Stats
from .backends.base import Backend
from .backends.choose import AGENT_RETRY_INTERVAL, AgentFollow, build, register_rules, resolve_cgroup  # noqa: F401 - re-exported
from .backends.kept import KeptChecks
from .backends.poll import DEFAULT_MIN_INTERVAL
from .config import (  # noqa: F401 - parse_threshold_text, check_backend re-exported for callers
    BACKENDS,
    check_backend,
    check_metric,
    check_seconds,
    parse_bool,
    parse_threshold,
    parse_threshold_text,
)
from .errors import RequestMemoryExceeded, RtmlError
from .levels import Level, make_clear
from .relief import Relief

if TYPE_CHECKING:
    pass

__all__ = ["Level", "Limiter", "Stats", "make_clear"]

log = logging.getLogger("rtml_ebpf")

MiB = 1 << 20

Callback = Callable[["Stats"], object]


class Limiter(LimiterReadings):
    """Answers "is this cgroup's memory limit reached?" on every call, cheaply.

    ``cgroup``: None for this process's memory cgroup, or a cgroup directory.
    ``threshold``: the hard level. A float in (0, 1] is a fraction of the effective limit,
    an int is bytes.
    ``soft_threshold``: optional soft level, below the hard one (shed optional work there).
    ``hysteresis``: a tripped level clears only below threshold minus this margin: a float is
    a fraction of the threshold's base (of the limit for fractions, of the threshold for bytes),
    an int is bytes. Default 0.02.
    ``metric``: ``"working_set"`` (usage minus inactive file cache, default) or ``"usage"``.
    ``backend``: ``"auto"`` (the node agent when one answers, else the node's shared load (root),
    else this process's own eBPF programs, else poll: see rtml_ebpf/backends/choose.py), ``"ebpf"`` (own
    programs), ``"agent"`` (the node agent's page) or ``"poll"``.
    ``fail_closed``: what the check answers if the backend breaks (default False: let work in).
    ``poll_interval``: poll backend only, seconds a file reading is reused (default 0.01).
    ``relief``: run ``gc.collect()`` + ``malloc_trim(0)`` when the hard level trips (and again
    while it stays tripped), rate-limited: True (the shared default, at most every 5 s),
    False, or a :class:`rtml_ebpf.relief.Relief`.
    ``on_trip`` / ``on_clear``: called with :class:`Stats` when the level rises / falls to OK.
    ``trip_ahead_ms``: also trip (HARD) while, at the current growth rate (smoothed over the last
    second of kernel readings), the OOM killer's limit is this many milliseconds away or less;
    the monitor thread decides it every 50 ms and the check reads its flag with the verdict.
    Clears when the limit is 1.5 times that far, or growth stops. Default None: off.
    """

    def __init__(
        self,
        cgroup: str | os.PathLike[str] | None = None,
        *,
        pid: int | None = None,
        threshold: float | int = 0.9,
        soft_threshold: float | int | None = None,
        hysteresis: float | int = 0.02,
        metric: str = "working_set",
        backend: str = "auto",
        fail_closed: bool = False,
        poll_interval: float = DEFAULT_MIN_INTERVAL,
        relief: bool | Relief = True,
        on_trip: Callback | None = None,
        on_clear: Callback | None = None,
        trip_ahead_ms: float | None = None,
    ) -> None:
        self._closed = True
        cfg = parse_settings(threshold=threshold, soft_threshold=soft_threshold, hysteresis=hysteresis,
                             metric=metric, backend=backend, fail_closed=fail_closed, poll_interval=poll_interval,
                             relief=relief, on_trip=on_trip, on_clear=on_clear, trip_ahead_ms=trip_ahead_ms)
        self._trip, self._clear, self._soft, self._soft_clear = cfg.trip, cfg.clear, cfg.soft, cfg.soft_clear
        self._metric, self._relief, self._fail_answer = cfg.metric, cfg.relief, cfg.fail_answer
        self._on_trip, self._on_clear = cfg.on_trip, cfg.on_clear
        self._sampler = Sampler(cfg.ahead_ms)
        self._ahead = self._sampler.ahead  # the trip-ahead flag the check reads, or None
        self._cgroup = resolve_cgroup(cgroup, pid)
        self._cgroup_id, self._lock, self._error_logged = self._cgroup.cgroup_id, threading.Lock(), False
        self._requested, self._interval, self._follow = backend, cfg.interval, AgentFollow(backend)
        self._hot: Any = None
        self._soft_hot: Any = None
        self._kept = KeptChecks()  # pages of backends left behind that kept checks still read
        self._bind(*build(self._cgroup, backend, cfg.interval, self._register))
        self._last_level = Level.OK
        self._closed = False
        self._last_level = self.level()
        self._upkeep = self._backend.needs_upkeep or self._backend.name == "ebpf"  # + limits set while idle
        if backend in ("agent", "auto") and self._backend.name == "poll":
            self._follow.arm()  # the agent may start later
        if self._relief is not None or on_trip is not None or on_clear is not None or self._upkeep or \
                self._follow.retry_at or self._ahead is not None:
            monitor().add(self)

    def _bind(self, backend: Backend, handle: object, soft: object | None) -> None:
        """Make ``backend`` the one answering (at build, and when the agent is lost or back)."""
        if hasattr(backend, "set_fail_answer"):
            backend.set_fail_answer(self._fail_answer)
        self._backend, self._handle, self._soft_handle = backend, handle, soft
        hot = backend.hot(handle)
        self._hot = hot
        self._soft_hot = None if soft is None else backend.hot(soft)
        if backend.hot_never_raises:
            # The check *is* a C-level read of the verdict byte, with no Python frame in between
            # (rtml_ebpf/_hot.c; a partial over operator.getitem where it was not built). It
            # holds the backend's handle, not this Limiter: a caller that keeps only
            # `lim.is_mem_limit_reached` keeps the watch alive, and dropping the Limiter frees it
            # by reference counting (no cycle).
            check = hot_check(hot, self._ahead)
            check.watch = handle  # type: ignore[attr-defined]
            self.is_mem_limit_reached = check  # type: ignore[method-assign,assignment]
        else:
            self.__dict__.pop("is_mem_limit_reached", None)

    def _switch(self, backend: Backend, why: str) -> None:
        """From the monitor: another backend takes over (agent lost, or back)."""
        try:
            new = self._register(backend)
        except BaseException:
            backend.close()
            raise
        with self._lock:
            if self._closed:
                old = None
                new[0].close()
            else:
                old = (self._backend, self._handle, self._soft_handle)
                self._bind(*new)
        if old is not None:
            log.warning("rtml-ebpf: %s: %s backend -> %s backend", why, old[0].name, backend.name)
            old[0].remove_rule(old[1], self._fail_answer)
            self._kept.keep(old[0], old[1], self._answer())
            if old[2] is not None:
                old[0].remove_rule(old[2], self._fail_answer)
            old[0].close()

    def _follow_agent(self) -> None:
        """The agent backend lost its programs: poll now. A poll limiter that wanted the agent
        tries it again every AGENT_RETRY_INTERVAL (see backends.choose.AgentFollow)."""
        step = self._follow.next(self._cgroup, self._cgroup_id, self._backend, self._interval)
        if step is None:
            return
        backend, why = step
        try:
            self._switch(backend, why)
        except (RtmlError, OSError) as exc:
            if backend.name == "poll":
                raise
            log.debug("rtml-ebpf: node agent still unavailable: %s", exc)
            return
        if backend.name != "poll":
            self._follow.retry_at = 0.0

    def _register(self, backend: Backend) -> tuple[Backend, object, object | None]:
        soft = None if self._soft is None or self._soft_clear is None else Rule(self._metric, self._soft,
                                                                                self._soft_clear)
        return register_rules(backend, Rule(self._metric, self._trip, self._clear), soft)

    # -- the hot path -------------------------------------------------------------------
    def is_mem_limit_reached(self) -> bool:
        """True while the cgroup is at or over the (hard) threshold. Never raises, never blocks."""
        try:
            return bool(self._hot[0]) or (self._ahead is not None and bool(self._ahead[0]))
        except Exception as exc:  # noqa: BLE001 - the check must never raise
            return self._failed(exc)

    def _answer(self) -> bool:
        """The current backend's hard verdict, for the kept checks (they read trip-ahead themselves)."""
        try:
            return bool(self._hot[0])
        except Exception as exc:  # noqa: BLE001
            return self._failed(exc)

    def level(self) -> Level:
        """OK, SOFT (at or over soft_threshold) or HARD (at or over threshold, or the limit within
        trip_ahead_ms at the current rate). Never raises."""
        try:
            if self._hot[0] or (self._ahead is not None and self._ahead[0]):
                return Level.HARD
            if self._soft_hot is not None and self._soft_hot[0]:
                return Level.SOFT
            return Level.OK
        except Exception as exc:  # noqa: BLE001
            return Level.HARD if self._failed(exc) else Level.OK

    def should_shed(self) -> bool:
        """Probabilistic shedding: True with probability :meth:`pressure` (always at HARD)."""
        if self.is_mem_limit_reached():
            return True
        if self._soft_hot is None:
            return False
        p = self.pressure()
        return p > 0.0 and random.random() < p

    def room(self) -> tuple[int | None, int | None]:
        """(bytes before the hard level trips, bytes before the OOM killer acts), by the metric;
        None when unlimited. Cheap on eBPF (a few reads of the mapping): admission calls it on
        every request. On a closed Limiter: (0, 0) when failing closed, else (None, None)."""
        if self._closed:
            return (0, 0) if self._fail_answer else (None, None)
        try:
            return self._backend.room(self._handle)
        except Exception as exc:  # noqa: BLE001
            return (0, 0) if self._failed(exc) else (None, None)

    def _failed(self, exc: BaseException) -> bool:
        if isinstance(exc, RequestMemoryExceeded):
            raise exc  # admission's enforcer ending this request: not a failure of the reading
        if not self._error_logged and not self._closed:
            self._error_logged = True
            log.error(
                "rtml-ebpf: the %s backend failed (%s); answering %s from now on (fail_%s)",
                self._backend.name, exc, self._fail_answer, "closed" if self._fail_answer else "open",
            )
        return self._fail_answer

    # -- transitions (called by the monitor thread) -------------------------------------
    def _observe(self) -> None:
        if self._closed:
            return
        self._backend.maintain(self._handle)  # the upkeep / limit check (eBPF), liveness (agent)
        self._sampler.sample(self._reading)
        if self._follow.wanted(self._backend):
            self._follow_agent()
        if self._kept:
            self._kept.mirror(self._answer())
        lvl = self.level()
        prev, self._last_level = self._last_level, lvl
        if lvl != prev:
            log_transition(self, prev, lvl)
            callback = self._on_trip if lvl > prev else (self._on_clear if lvl is Level.OK else None)
            if callback is not None:
                try:
                    callback(self.stats())
                except Exception:  # noqa: BLE001 - a user callback must not stop the monitor
                    log.exception("rtml-ebpf: %s callback failed", "on_trip" if lvl > prev else "on_clear")
        if lvl is Level.HARD and self._relief is not None:
            self._relief.run(reason=f"{self._cgroup.directory} at HARD")

    def _reading(self) -> tuple[int, int | None]:
        snap = self._backend.snapshot(self._handle, full=False)
        return snap.used, snap.headroom

    # -- lifecycle ----------------------------------------------------------------------
    def close(self) -> None:
        """Stop watching; the BPF programs are detached when the last watch is gone.

        A check kept from before (``check = lim.is_mem_limit_reached``) answers the fail
        answer from now on: it never reads a slot lent to another cgroup.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            # Closed limiters keep answering (the fail answer) rather than touch a dropped view.
            self._hot = (self._fail_answer,)
            self._soft_hot = None
            self.is_mem_limit_reached = functools.partial(bool, self._fail_answer)  # type: ignore[method-assign]
            backend, handle, soft = self._backend, self._handle, self._soft_handle
            self._handle = self._soft_handle = None  # drop the watch: nothing pins the mapping
        backend.remove_rule(handle, self._fail_answer)
        if soft is not None:
            backend.remove_rule(soft, self._fail_answer)
        backend.close()
        self._kept.release(self._fail_answer)

    def __enter__(self) -> Limiter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
