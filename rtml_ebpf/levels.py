"""Graded levels and the clear point below a threshold (hysteresis): pure arithmetic that the
Limiter, the monitor's log lines and the integrations share, with no backend behind it."""

from __future__ import annotations

import enum

from ._rules import PPM, Threshold
from .errors import ConfigError


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


def same_kind_not_below(soft: Threshold, hard: Threshold) -> bool:
    """True when ``soft`` is comparable with ``hard`` (both fractions or both bytes) and not below it."""
    if soft.ppm is not None and hard.ppm is not None:
        return soft.ppm >= hard.ppm
    if soft.nbytes is not None and hard.nbytes is not None:
        return soft.nbytes >= hard.nbytes
    return False  # mixed kinds: comparable only against a limit, at run time
