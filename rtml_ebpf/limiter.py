"""The Limiter: one memory cgroup, one threshold, one backend."""

from __future__ import annotations

import enum
import functools
import logging
import operator
import os
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any

from . import _cgroup
from ._backend import Backend
from ._growth import Growth, seconds_to
from ._kept import KeptChecks
from ._poll import DEFAULT_MIN_INTERVAL, PollBackend
from ._rules import PPM, Rule, Threshold
from .config import (  # noqa: F401 - parse_threshold_text, check_backend re-exported for callers
    BACKENDS,
    check_backend,
    check_metric,
    check_seconds,
    env_hooks,
    parse_bool,
    parse_threshold,
    parse_threshold_text,
)
from .errors import AgentUnavailable, CapacityError, CgroupNotFound, ConfigError, RtmlError
from .relief import Relief, default_relief

if TYPE_CHECKING:
    from ._meter import Meter

log = logging.getLogger("rtml_ebpf")

MiB = 1 << 20
GROWTH_SAMPLE_INTERVAL = 0.1  # the monitor's readings for stats().growth_bytes_per_s
AHEAD_SAMPLE_INTERVAL = 0.05  # with trip_ahead_ms: every look of the monitor
AHEAD_CLEAR_FACTOR = 1.5  # a trip-ahead clears when the limit is this many times trip_ahead_ms away
MAX_AHEAD_MS = 600_000
AGENT_RETRY_INTERVAL = 5.0  # a Limiter that lost the node agent looks for it again this often


@dataclass(frozen=True)
class Stats:
    """A reading of the limiter's cgroup. Sizes in bytes; None means "no limit"."""

    usage_bytes: int  # the cgroup's own usage (memory.current / memory.usage_in_bytes)
    working_set_bytes: int  # usage - inactive_file (as the tightest ancestor sees usage)
    limit_bytes: int | None  # effective limit: the tightest on the path to the root
    limit_source: str | None  # the cgroup directory that sets it
    threshold_bytes: int | None  # where the limiter trips, None when it cannot (no limit)
    headroom_bytes: int | None  # threshold - metric: what may still be allocated before tripping
    limit_headroom_bytes: int | None  # bytes left before the kernel's OOM killer acts
    metric: str
    tripped: bool
    backend: str
    backend_reason: str
    hooks: tuple[str, ...]
    cgroup_path: str
    cgroup_dir: str
    cgroup_id: int
    cgroup_version: int
    updated_ns: int  # CLOCK_MONOTONIC (time.monotonic_ns()) of the reading
    oom_kills: int  # ebpf: OOM victims seen since watched; poll: the cgroup's counter
    faults: int | None  # ebpf with the page_fault_user hook: user page faults seen since watched
    soft_threshold_bytes: int | None = None
    level: str = "OK"
    trips: int = 0  # clear -> tripped transitions of the hard level
    soft_trips: int = 0
    relief_runs: int = 0
    relief_bytes: int = 0
    growth_bytes_per_s: float | None = None  # smoothed rate of the metric's "used" (see _growth.py)
    seconds_to_limit: float | None = None  # at that rate, until the OOM killer's limit; None if not growing
    tripped_ahead: bool = False  # trip_ahead_ms: the limit is that close at the current rate

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class _EitherByte:
    """``view[0] or ahead[0]`` where the C Verdict was not built."""

    __slots__ = ("view", "ahead", "watch")

    def __init__(self, view: Any, ahead: bytearray) -> None:
        self.view, self.ahead, self.watch = view, ahead, None

    def __call__(self) -> bool:
        return bool(self.view[0] or self.ahead[0])

    def __getitem__(self, index: int) -> bool:
        return self()


def hot_check(view: Any, ahead: bytearray | None = None) -> Any:
    """A zero-argument C callable answering ``bool(view[0])`` for a one-byte verdict view (or
    ``ahead[0]``, the trip-ahead flag, where given)."""
    try:
        from ._hot import Verdict

        return Verdict(view) if ahead is None else Verdict(view, 0, ahead)
    except ImportError:  # built without a compiler: the pure-Python binding (about 2x slower)
        if ahead is not None:
            return _EitherByte(view, ahead)
        return functools.partial(operator.getitem, view, 0)


def resolve_cgroup(cgroup: object, pid: object) -> _cgroup.MemoryCgroup:
    if cgroup is not None and pid is not None:
        raise ConfigError(f"cgroup={cgroup!r} and pid={pid!r}: pass one of them, not both")
    if pid is not None:
        if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0:
            raise ConfigError(f"pid={pid!r}: pass a positive process id")
        return _cgroup.find_process_cgroup(pid)
    if cgroup is None:
        return _cgroup.find_process_cgroup()
    if not isinstance(cgroup, (str, os.PathLike)):
        raise CgroupNotFound(f"cgroup={cgroup!r}: pass a cgroup directory path (str), or None for this process")
    return _cgroup.cgroup_from_directory(os.fspath(cgroup))


def make_backend(cg: _cgroup.MemoryCgroup, backend: str, poll_interval: float = DEFAULT_MIN_INTERVAL) -> Backend:
    """The backend asked for; ``auto``: eBPF when this process may load it, else the node agent
    when its socket is there, else polling. The agent is reached at the first rule
    (Limiter._build falls back from there)."""
    if backend == "poll":
        return PollBackend(cg, "poll requested", min_interval=poll_interval)
    if backend == "agent":
        from .agent.client import AgentBackend

        return AgentBackend(cg, "agent requested")
    env_hooks()  # a bad RTML_HOOKS is a ConfigError naming it, never eBPF quietly skipped
    try:
        from .ebpf.backend import EbpfBackend

        return EbpfBackend(cg, "ebpf requested" if backend == "ebpf" else "auto")
    except ConfigError:
        raise
    except (RtmlError, OSError) as exc:
        if backend == "ebpf":
            raise
        from .agent.client import AgentBackend, socket_path

        if os.path.exists(socket_path()):
            return AgentBackend(cg, f"auto: eBPF unavailable ({exc}); agent")
        return PollBackend(
            cg, f"auto: eBPF unavailable ({exc}); no node agent at {socket_path()}; polling the cgroup files",
            min_interval=poll_interval)


class Level(enum.IntEnum):
    """Graded pressure: shed optional work at SOFT, everything at HARD."""

    OK = 0
    SOFT = 1
    HARD = 2


def make_clear(trip: Threshold, hysteresis: object, name: str = "hysteresis") -> Threshold:
    """The clear point below ``trip``: a float is a fraction of the threshold's base, an int is bytes."""
    if isinstance(hysteresis, bool) or not isinstance(hysteresis, (int, float)):
        raise ConfigError(f"{name}={hysteresis!r}: pass a float in [0, 1) or an int (bytes)")
    if isinstance(hysteresis, float):
        if not 0.0 <= hysteresis < 1.0:
            raise ConfigError(f"{name}={hysteresis!r}: a float margin must be in [0, 1), e.g. 0.02")
        if trip.ppm is not None:  # points of the limit
            return Threshold(ppm=max(0, trip.ppm - round(hysteresis * PPM)))
        return Threshold(nbytes=int((trip.nbytes or 0) * (1 - hysteresis)))
    if hysteresis < 0:
        raise ConfigError(f"{name}={hysteresis!r}: a margin in bytes must be >= 0")
    if trip.ppm is not None:
        raise ConfigError(
            f"{name}={hysteresis!r} is bytes but the threshold is a fraction of the limit; "
            "pass a float margin such as 0.02, or a byte threshold"
        )
    return Threshold(nbytes=max(0, (trip.nbytes or 0) - hysteresis))


Callback = Callable[["Stats"], object]


class Limiter:
    """Answers "is this cgroup's memory limit reached?" on every call, cheaply.

    ``cgroup``: None for this process's memory cgroup, or a cgroup directory.
    ``threshold``: the hard level. A float in (0, 1] is a fraction of the effective limit,
    an int is bytes.
    ``soft_threshold``: optional soft level, below the hard one (shed optional work there).
    ``hysteresis``: a tripped level clears only below threshold minus this margin: a float is
    a fraction of the threshold's base (of the limit for fractions, of the threshold for bytes),
    an int is bytes. Default 0.02.
    ``metric``: ``"working_set"`` (usage minus inactive file cache, default) or ``"usage"``.
    ``backend``: ``"auto"`` (eBPF when it can load, else the node agent when its socket is there,
    else poll), ``"ebpf"``, ``"agent"`` (the node agent's page, for unprivileged processes) or ``"poll"``.
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
        self._ahead: bytearray | None = None
        self._ahead_ms = 0.0
        if trip_ahead_ms is not None:
            if isinstance(trip_ahead_ms, bool) or not isinstance(trip_ahead_ms, (int, float)) or \
                    not 0 < trip_ahead_ms <= MAX_AHEAD_MS:
                raise ConfigError(f"trip_ahead_ms={trip_ahead_ms!r}: milliseconds above 0 and up to {MAX_AHEAD_MS} "
                                  "(e.g. 500: trip when the limit is half a second away at the current rate)")
            self._ahead, self._ahead_ms = bytearray(1), float(trip_ahead_ms)
        self._trip = parse_threshold(threshold)
        self._soft = None if soft_threshold is None else parse_threshold(soft_threshold, name="soft_threshold")
        if self._soft is not None and _same_kind_not_below(self._soft, self._trip):
            raise ConfigError(
                f"soft_threshold={soft_threshold!r} must be below threshold={threshold!r}; "
                "the soft level sheds optional work before the hard one sheds everything"
            )
        self._clear = make_clear(self._trip, hysteresis)
        self._soft_clear = None if self._soft is None else make_clear(self._soft, hysteresis)
        self._metric = check_metric(metric)
        check_backend(backend)
        interval = check_seconds(poll_interval, name="poll_interval", high=60)
        if relief is True:
            self._relief: Relief | None = default_relief()
        elif relief is False or relief is None:
            self._relief = None
        elif isinstance(relief, Relief):
            self._relief = relief
        else:
            raise ConfigError(f"relief={relief!r}: pass True, False or a rtml_ebpf.relief.Relief")
        for cb_name, cb in (("on_trip", on_trip), ("on_clear", on_clear)):
            if cb is not None and not callable(cb):
                raise ConfigError(f"{cb_name}={cb!r}: pass a callable taking a Stats, or None")
        self._on_trip = on_trip
        self._on_clear = on_clear
        self._fail_answer = parse_bool(fail_closed, name="fail_closed")
        self._cgroup = resolve_cgroup(cgroup, pid)
        self._cgroup_id = self._cgroup.cgroup_id
        self._lock = threading.Lock()
        self._error_logged = False
        self._requested = backend
        self._interval = interval
        self._growth = Growth()
        self._next_growth_sample = 0.0
        self._retry_agent_at = 0.0
        self._hot: Any = None
        self._soft_hot: Any = None
        self._kept = KeptChecks()  # pages of backends left behind that kept checks still read
        self._bind(*self._build(backend, interval))
        self._last_level = Level.OK
        self._closed = False
        self._last_level = self.level()
        self._upkeep = self._backend.needs_upkeep
        if backend in ("agent", "auto") and self._backend.name == "poll":
            self._retry_agent_at = time.monotonic() + AGENT_RETRY_INTERVAL  # the agent may start later
        if self._relief is not None or on_trip is not None or on_clear is not None or self._upkeep or \
                self._retry_agent_at or self._ahead is not None:
            from ._monitor import monitor

            monitor().add(self)

    def _build(self, backend: str, interval: float) -> tuple[Backend, object, object | None]:
        """The backend with the hard (and soft) rule registered. ``auto`` falls back to polling
        when the loaded programs have no room left (slots, rules, nesting)."""
        chosen = make_backend(self._cgroup, backend, interval)
        try:
            return self._register(chosen)
        except AgentUnavailable as exc:
            chosen.close()
            if backend != "auto":
                raise
            poll = PollBackend(self._cgroup, f"auto: eBPF unavailable; node agent unavailable ({exc}); polling the "
                               "cgroup files", min_interval=interval)
            return self._register(poll)
        except CapacityError as exc:
            chosen.close()
            if backend != "auto":
                raise
            poll = PollBackend(self._cgroup, f"auto: eBPF at capacity ({exc}); polling the cgroup files",
                               min_interval=interval)
            return self._register(poll)
        except BaseException:
            chosen.close()
            raise

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
        tries it again every AGENT_RETRY_INTERVAL once its socket is there."""
        lost = getattr(self._backend, "lost", None)
        if lost:
            self._retry_agent_at = time.monotonic() + AGENT_RETRY_INTERVAL
            self._switch(PollBackend(self._cgroup, f"node agent lost ({lost}); polling the cgroup files",
                                     min_interval=self._interval), f"node agent lost ({lost})")
            return
        if self._backend.name != "poll" or self._requested not in ("agent", "auto") or not self._retry_agent_at:
            return
        now = time.monotonic()
        if now < self._retry_agent_at:
            return
        self._retry_agent_at = now + AGENT_RETRY_INTERVAL
        from .agent.client import AgentBackend, socket_path

        if not os.path.exists(socket_path()):
            return
        try:
            self._switch(AgentBackend(self._cgroup, "node agent back"), "node agent back")
            self._retry_agent_at = 0.0
        except (RtmlError, OSError) as exc:
            log.debug("rtml-ebpf: node agent still unavailable: %s", exc)

    def _register(self, backend: Backend) -> tuple[Backend, object, object | None]:
        handle = backend.add_rule(Rule(self._metric, self._trip, self._clear))
        soft = None
        if self._soft is not None and self._soft_clear is not None:
            try:
                soft = backend.add_rule(Rule(self._metric, self._soft, self._soft_clear))
            except BaseException:
                backend.remove_rule(handle)
                raise
        return backend, handle, soft

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

    def pressure(self) -> float:
        """0.0 below the soft level, 1.0 at the hard one, linear in between (by the metric).

        Without a soft level: 0.0 or 1.0. Reads the backend's snapshot when between the
        levels (no syscall on eBPF), so it costs a few microseconds there.
        """
        lvl = self.level()
        if lvl is Level.HARD:
            return 1.0
        if lvl is Level.OK or self._soft is None:
            return 0.0
        try:
            snap = self._backend.snapshot(self._handle, full=False)
            value = snap.working_set if self._metric == "working_set" else snap.used
            lo = self._soft.resolve(snap.limit)
            hi = self._trip.resolve(snap.limit)
            if lo is None or hi is None or hi <= lo:
                return 1.0
            return min(1.0, max(0.0, (value - lo) / (hi - lo)))
        except Exception as exc:  # noqa: BLE001
            return 1.0 if self._failed(exc) else 0.0

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

    def thread_meter(self) -> Meter | None:
        """The kernel-fed per-thread charge meter (eBPF), or None (see rtml_ebpf._meter)."""
        return None if self._closed else self._backend.thread_meter()

    def _failed(self, exc: BaseException) -> bool:
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
        self._sample_growth()
        if self._retry_agent_at or self._backend.name == "agent":
            self._follow_agent()
        if self._kept:
            self._kept.mirror(self._answer())
        lvl = self.level()
        prev, self._last_level = self._last_level, lvl
        if lvl != prev:
            from ._monitor import log_transition

            log_transition(self, prev, lvl)
            callback = self._on_trip if lvl > prev else (self._on_clear if lvl is Level.OK else None)
            if callback is not None:
                try:
                    callback(self.stats())
                except Exception:  # noqa: BLE001 - a user callback must not stop the monitor
                    log.exception("rtml-ebpf: %s callback failed", "on_trip" if lvl > prev else "on_clear")
        if lvl is Level.HARD and self._relief is not None:
            self._relief.run(reason=f"{self._cgroup.directory} at HARD")

    def _sample_growth(self) -> None:
        """One reading for the growth rate every GROWTH_SAMPLE_INTERVAL (no syscall on the
        kernel-fed backends; a cached file read on the poll backend)."""
        now = time.monotonic()
        if now < self._next_growth_sample:
            return
        self._next_growth_sample = now + (GROWTH_SAMPLE_INTERVAL if self._ahead is None else AHEAD_SAMPLE_INTERVAL)
        try:
            snap = self._backend.snapshot(self._handle, full=False)
        except Exception:  # noqa: BLE001 - a missed reading only thins the window
            return
        self._growth.add(time.monotonic_ns(), snap.used)
        if self._ahead is not None:
            self._judge_ahead(snap.headroom)

    def _judge_ahead(self, room: int | None) -> None:
        """Set or clear the trip-ahead flag from the rate and the room left before the limit."""
        assert self._ahead is not None
        left = seconds_to(room, self._growth.rate(time.monotonic_ns()))
        if left is None:
            self._ahead[0] = 0
        elif left * 1000 <= self._ahead_ms:
            self._ahead[0] = 1
        elif left * 1000 > self._ahead_ms * AHEAD_CLEAR_FACTOR:
            self._ahead[0] = 0

    # -- introspection ------------------------------------------------------------------
    @property
    def backend(self) -> str:
        return self._backend.name

    @property
    def cgroup(self) -> _cgroup.MemoryCgroup:
        return self._cgroup

    @property
    def cgroup_id(self) -> int:
        """The id of the cgroup as it was when this Limiter was built (the kernel's, stable)."""
        return self._cgroup_id

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def threshold(self) -> Threshold:
        return self._trip

    @property
    def soft_threshold(self) -> Threshold | None:
        return self._soft

    @property
    def metric(self) -> str:
        return self._metric

    @property
    def trip_ahead_ms(self) -> float | None:
        return self._ahead_ms if self._ahead is not None else None

    @property
    def relief(self) -> Relief | None:
        return self._relief

    def stats(self) -> Stats:
        """A consistent reading (may read files: not for the hot path).

        Raises RtmlError on a closed Limiter, CgroupNotFound once the cgroup was removed (or
        removed and made again: the new one is another cgroup, build a new Limiter for it).
        """
        with self._lock:
            if self._closed:
                raise RtmlError(f"{self!r} is closed; build a new Limiter to read this cgroup")
            backend, handle, soft_handle = self._backend, self._handle, self._soft_handle
        try:
            same = os.stat(self._cgroup.directory).st_ino == self._cgroup_id
        except OSError:
            same = False
        if not same:
            raise CgroupNotFound(
                f"cgroup {self._cgroup.directory} was removed (or removed and recreated) after this Limiter "
                "was built; close it and build a new Limiter for the cgroup that is there now"
            )
        try:
            snap = backend.snapshot(handle)
        except FileNotFoundError as exc:
            raise CgroupNotFound(f"cgroup {self._cgroup.directory} was removed while being read: {exc}") from None
        value = snap.working_set if self._metric == "working_set" else snap.used
        threshold = None if (self._trip.ppm is not None and snap.limit is None) else self._trip.resolve(snap.limit)
        now_ns = time.monotonic_ns()
        self._growth.add(now_ns, snap.used)
        rate = self._growth.rate(now_ns)
        return Stats(
            usage_bytes=snap.usage,
            working_set_bytes=snap.working_set,
            limit_bytes=snap.limit,
            limit_source=snap.limit_source,
            threshold_bytes=threshold,
            headroom_bytes=None if threshold is None else threshold - value,
            limit_headroom_bytes=snap.headroom,
            metric=self._metric,
            tripped=self.is_mem_limit_reached(),
            backend=backend.name,
            backend_reason=backend.reason,
            hooks=tuple(backend.hooks),
            cgroup_path=self._cgroup.path,
            cgroup_dir=self._cgroup.directory,
            cgroup_id=self._cgroup_id,
            cgroup_version=self._cgroup.version,
            updated_ns=snap.updated_ns or time.monotonic_ns(),
            oom_kills=snap.oom_kills,
            faults=snap.faults,
            soft_threshold_bytes=None if self._soft is None or (self._soft.ppm is not None and snap.limit is None)
            else self._soft.resolve(snap.limit),
            level=self.level().name,
            trips=backend.trips(handle),
            soft_trips=0 if soft_handle is None else backend.trips(soft_handle),
            relief_runs=self._relief.stats.runs if self._relief else 0,
            relief_bytes=self._relief.stats.bytes_returned if self._relief else 0,
            growth_bytes_per_s=rate,
            seconds_to_limit=seconds_to(snap.headroom, rate),
            tripped_ahead=self._ahead is not None and bool(self._ahead[0]),
        )

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

    def __repr__(self) -> str:
        soft = f", soft_threshold={self._soft.describe()!r}" if self._soft else ""
        return (
            f"Limiter(cgroup={self._cgroup.directory!r}, threshold={self._trip.describe()!r}{soft}, "
            f"metric={self._metric!r}, backend={self._backend.name!r})"
        )


def _same_kind_not_below(soft: Threshold, hard: Threshold) -> bool:
    if soft.ppm is not None and hard.ppm is not None:
        return soft.ppm >= hard.ppm
    if soft.nbytes is not None and hard.nbytes is not None:
        return soft.nbytes >= hard.nbytes
    return False  # mixed kinds: comparable only against a limit, at run time
