"""What a Limiter tells about itself: its settings, ``stats()`` and ``pressure()`` (readings,
not the hot check). A base class of :class:`rtml_ebpf.limiter.Limiter`, which owns every field
declared here; kept apart so the Limiter is the check, the levels and the lifecycle."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

from ._cgroup import MemoryCgroup
from ._growth import Sampler, seconds_to
from ._high import HighSnapshot, snapshot_ceiling
from ._psi import read_pressure
from ._rules import Threshold
from ._stall import StallMeter
from ._stats import Stats, build_stats
from .backends.base import Backend
from .errors import CgroupNotFound, RtmlError
from .levels import Level
from .relief import Relief

if TYPE_CHECKING:
    from .backends.meter import Meter


class RoomReader(NamedTuple):
    """:meth:`Limiter.room` made once (see :meth:`Limiter.room_reader`)."""

    check: object  # the limiter's is_mem_limit_reached when made
    watch: Any  # the backend's handle: its ``closed`` says the slot may be another cgroup's now
    room: Callable[[], tuple[int | None, int | None]]  # also .fits(...): see rtml_ebpf/_hot.c Room


class LimiterReadings:
    """Readings and settings of a Limiter (see rtml_ebpf.limiter)."""

    _ahead: bytearray | None
    _backend: Backend
    _cgroup: MemoryCgroup
    _cgroup_id: int
    _closed: bool
    _handle: object
    _soft_handle: object | None
    _lock: threading.Lock
    _metric: str
    _relief: Relief | None
    _sampler: Sampler
    _soft: Threshold | None
    _trip: Threshold

    # -- what admission reads of the backend ---------------------------------------------
    def thread_meter(self) -> Meter | None:
        """The kernel-fed per-thread charge meter (eBPF), or None (see rtml_ebpf.backends.meter)."""
        return None if self._closed else self._backend.thread_meter()

    def waker(self, poll: float) -> Any:
        """The kernel's wake for admission's enforcer (rtml_ebpf/admission/enforce.py), or None."""
        return None if self._closed else self._backend.waker(self._handle, poll)

    def room_reader(self) -> RoomReader | None:
        """:meth:`room` made once, for a caller that asks on every request (admission): one C call
        on the eBPF backend, None elsewhere (and where the extension was not built). It stands for
        :meth:`room` only while ``is_mem_limit_reached is reader.check and not reader.watch.closed``
        (another backend, a closed Limiter or a removed cgroup end it); then ask :meth:`room`."""
        with self._lock:
            make = getattr(self._backend, "room_reader", None)
            check = self.__dict__.get("is_mem_limit_reached")
            room = None if self._closed or make is None or check is None else make(self._handle)
            return None if room is None else RoomReader(check, self._handle, room)

    def is_mem_limit_reached(self) -> bool:
        raise NotImplementedError

    def level(self) -> Level:
        raise NotImplementedError

    def _failed(self, exc: BaseException) -> bool:
        raise NotImplementedError

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
            top = snapshot_ceiling(snap)
            lo = self._soft.resolve(top)
            hi = self._trip.resolve(top)
            if lo is None or hi is None or hi <= lo:
                return 1.0
            return min(1.0, max(0.0, (value - lo) / (hi - lo)))
        except Exception as exc:  # noqa: BLE001
            return 1.0 if self._failed(exc) else 0.0

    def stalling(self) -> bool:
        """True while the cgroup stalls on memory: PSI ``some`` over 15% of the last second
        (cgroup v2; read at most every 100 ms, never raises; False where there is no PSI)."""
        meter: StallMeter | None = getattr(self, "_stall_meter", None)
        if meter is None:
            meter = self._stall_meter = StallMeter(self._cgroup)
        return meter.stalling()

    # -- introspection ------------------------------------------------------------------
    @property
    def backend(self) -> str:
        return self._backend.name

    @property
    def cgroup(self) -> MemoryCgroup:
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
        return self._sampler.ahead_ms if self._ahead is not None else None

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
        if not isinstance(snap, HighSnapshot):
            # a backend whose reading lacks memory.high (an agent client's page before ABI 5's
            # fields are read there): the files say it; the verdict itself is the kernel's
            highs = self._cgroup.effective_high()
            snap = HighSnapshot(**snap.__dict__, high=highs.limit_bytes, high_source=highs.source)
        psi, psi_reason = read_pressure(self._cgroup)
        now_ns = time.monotonic_ns()
        growth = self._sampler.growth
        growth.add(now_ns, snap.used)
        rate = growth.rate(now_ns)
        return build_stats(snap, metric=self._metric, trip=self._trip, soft=self._soft, fields=dict(
            tripped=self.is_mem_limit_reached(), backend=backend.name, backend_reason=backend.reason,
            hooks=tuple(backend.hooks), cgroup_path=self._cgroup.path, cgroup_dir=self._cgroup.directory,
            cgroup_id=self._cgroup_id, cgroup_version=self._cgroup.version,
            updated_ns=snap.updated_ns or time.monotonic_ns(), level=self.level().name, trips=backend.trips(handle),
            soft_trips=0 if soft_handle is None else backend.trips(soft_handle),
            relief_runs=self._relief.stats.runs if self._relief else 0,
            relief_bytes=self._relief.stats.bytes_returned if self._relief else 0, growth_bytes_per_s=rate,
            seconds_to_limit=seconds_to(snap.headroom, rate),
            tripped_ahead=self._ahead is not None and bool(self._ahead[0]),
            pressure_some_avg10=psi and psi.some_avg10, pressure_some_total_us=psi and psi.some_total_us,
            pressure_full_avg10=psi and psi.full_avg10, pressure_full_total_us=psi and psi.full_total_us,
            pressure_reason=psi_reason, stalling=None if psi is None else self.stalling()))

    def __repr__(self) -> str:
        soft = f", soft_threshold={self._soft.describe()!r}" if self._soft else ""
        return (
            f"Limiter(cgroup={self._cgroup.directory!r}, threshold={self._trip.describe()!r}{soft}, "
            f"metric={self._metric!r}, backend={self._backend.name!r})"
        )


