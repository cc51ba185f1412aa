"""A Limiter's arguments, checked once at construction: every bad value is a ConfigError that
names it and how to fix it, before any cgroup or backend is touched."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ._rules import Threshold
from .config import check_backend, check_metric, check_seconds, parse_bool, parse_threshold
from .errors import ConfigError
from .levels import make_clear, same_kind_not_below
from .relief import Relief, default_relief

MAX_AHEAD_MS = 600_000


@dataclass(frozen=True)
class Settings:
    trip: Threshold
    clear: Threshold
    soft: Threshold | None
    soft_clear: Threshold | None
    metric: str
    backend: str
    interval: float
    relief: Relief | None
    on_trip: Callable[[Any], object] | None
    on_clear: Callable[[Any], object] | None
    fail_answer: bool
    ahead_ms: float | None


def parse_settings(*, threshold: object, soft_threshold: object, hysteresis: object, metric: object,
                   backend: object, fail_closed: object, poll_interval: object, relief: object, on_trip: object,
                   on_clear: object, trip_ahead_ms: object) -> Settings:
    ahead_ms = None
    if trip_ahead_ms is not None:
        if isinstance(trip_ahead_ms, bool) or not isinstance(trip_ahead_ms, (int, float)) or \
                not 0 < trip_ahead_ms <= MAX_AHEAD_MS:
            raise ConfigError(f"trip_ahead_ms={trip_ahead_ms!r}: milliseconds above 0 and up to {MAX_AHEAD_MS} "
                              "(e.g. 500: trip when the limit is half a second away at the current rate)")
        ahead_ms = float(trip_ahead_ms)
    trip = parse_threshold(threshold)
    soft = None if soft_threshold is None else parse_threshold(soft_threshold, name="soft_threshold")
    if soft is not None and same_kind_not_below(soft, trip):
        raise ConfigError(
            f"soft_threshold={soft_threshold!r} must be below threshold={threshold!r}; "
            "the soft level sheds optional work before the hard one sheds everything"
        )
    clear = make_clear(trip, hysteresis)
    soft_clear = None if soft is None else make_clear(soft, hysteresis)
    checked_metric = check_metric(metric)
    check_backend(backend)
    interval = check_seconds(poll_interval, name="poll_interval", high=60)
    if relief is True:
        chosen: Relief | None = default_relief()
    elif relief is False or relief is None:
        chosen = None
    elif isinstance(relief, Relief):
        chosen = relief
    else:
        raise ConfigError(f"relief={relief!r}: pass True, False or a rtml_ebpf.relief.Relief")
    for cb_name, cb in (("on_trip", on_trip), ("on_clear", on_clear)):
        if cb is not None and not callable(cb):
            raise ConfigError(f"{cb_name}={cb!r}: pass a callable taking a Stats, or None")
    return Settings(trip, clear, soft, soft_clear, checked_metric, str(backend), interval, chosen,
                    on_trip if callable(on_trip) else None, on_clear if callable(on_clear) else None,
                    parse_bool(fail_closed, name="fail_closed"), ahead_ms)
