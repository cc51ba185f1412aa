"""Every setting's parser and every ``RTML_*`` variable, validated in one place.

Bad values raise :class:`ConfigError` naming the setting, the value and the fix; the
environment is read only when asked (never at import). The Limiter, the default limiter,
the integrations and the CLI all parse through here, so one spelling means one thing.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass

from ._rules import METRICS, PPM, Threshold
from .ebpf import hooks
from .errors import ConfigError

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
BACKENDS = ("auto", "ebpf", "agent", "poll")
# A byte threshold at or above this is larger than any limit the kernel can hold (its
# PAGE_COUNTER_MAX is 2^63 / PAGE_SIZE pages); refusing it keeps the kernel's u64 page
# arithmetic from wrapping.
MAX_THRESHOLD_BYTES = 1 << 60
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off", "")
_SUFFIXES = {"k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12, "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}


def parse_threshold(value: object, *, name: str = "threshold") -> Threshold:
    """A float in (0, 1] is a fraction of the limit; an int is bytes (at least one page)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{name}={value!r}: pass a float in (0, 1] (fraction of the limit) or an int (bytes)")
    if isinstance(value, float):
        if not 0.0 < value <= 1.0 or math.isnan(value):
            raise ConfigError(
                f"{name}={value!r}: a float threshold is a fraction of the limit and must be in (0, 1]; "
                "pass bytes as an int (e.g. 200 * 2**20)"
            )
        return Threshold(ppm=max(1, round(value * PPM)))
    if value <= 0:
        raise ConfigError(f"{name}={value!r}: a byte threshold must be positive")
    if value < PAGE_SIZE:
        # Every value suggested here is accepted, in the API and in the text forms alike.
        percent = ("1.0 for the whole limit, " if value == 1 else
                   f"{value / 100!r} for {value}% of the limit, " if value <= 100 else "")
        raise ConfigError(
            f"{name}={value!r} is read as {value} bytes, less than one page; pass {percent}"
            f"{value << 20} for {value} MiB, or another size of at least {PAGE_SIZE} bytes"
        )
    if value >= MAX_THRESHOLD_BYTES:
        raise ConfigError(
            f"{name}={value!r} bytes is beyond any memory limit (>= 2^60); pass a real size or a fraction"
        )
    return Threshold(nbytes=int(value))


def _split_suffix(low: str) -> tuple[str, int]:
    for suffix in sorted(_SUFFIXES, key=len, reverse=True):
        if low.endswith(suffix):
            return low[: -len(suffix)], _SUFFIXES[suffix]
    return low, 1


def _finite(text: str) -> float:
    number = float(text)
    if not math.isfinite(number):
        raise ValueError(text)
    return number


def parse_threshold_text(text: str, *, name: str = "RTML_THRESHOLD") -> Threshold:
    """Text form (environment, CLI): ``0.9``, ``90%``, ``536870912``, ``512Mi``, ``1.5G``."""
    if not isinstance(text, str):
        raise ConfigError(f"{name}={text!r}: pass text such as 0.9, 90% or 512Mi")
    low = text.strip().lower().removesuffix("b")
    try:
        if low.endswith("%"):
            return parse_threshold(_finite(low[:-1]) / 100, name=name)
        number, unit = _split_suffix(low)
        if unit != 1:
            return parse_threshold(int(_finite(number) * unit), name=name)
        if "." in low or "e" in low:
            return parse_threshold(_finite(low), name=name)
        return parse_threshold(int(low), name=name)
    except ConfigError:
        raise
    except (ValueError, OverflowError):
        raise ConfigError(
            f"{name}={text!r}: not a threshold; use a fraction (0.9 or 90%) or a size (512Mi, 536870912)"
        ) from None


def threshold_value(t: Threshold) -> float | int:
    """The Limiter argument that stands for ``t`` (a fraction as float, bytes as int)."""
    return t.nbytes if t.nbytes is not None else (t.ppm or 0) / PPM


def parse_size(text: str, *, name: str) -> int:
    """A whole size in bytes (``256Mi``, ``268435456``); fractions of a limit are refused."""
    low = str(text).strip().lower().removesuffix("b")
    try:
        number, unit = _split_suffix(low)
        value = int(_finite(number) * unit)
    except (ValueError, OverflowError):
        raise ConfigError(f"{name}={text!r}: not a size; use e.g. 256Mi or 268435456") from None
    if value < PAGE_SIZE:
        raise ConfigError(f"{name}={text!r}: a size must be at least one page ({PAGE_SIZE} bytes)")
    if value >= MAX_THRESHOLD_BYTES:
        raise ConfigError(f"{name}={text!r}: larger than any memory limit")
    return value


def parse_bool(value: object, *, name: str) -> bool:
    """A real bool, or text that says one unambiguously (1/0, true/false, yes/no, on/off)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        low = value.strip().lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
    raise ConfigError(f"{name}={value!r}: pass a boolean (1/0, true/false, yes/no, on/off)")


def check_metric(metric: object, *, name: str = "metric") -> str:
    if metric not in METRICS:
        raise ConfigError(f"{name}={metric!r}: use one of {', '.join(map(repr, METRICS))}")
    return str(metric)


def check_backend(backend: object, *, name: str = "backend") -> str:
    if backend not in BACKENDS:
        raise ConfigError(f"{name}={backend!r}: use one of {', '.join(map(repr, BACKENDS))}")
    return str(backend)


def check_seconds(value: object, *, name: str, low: float = 0.0, high: float = 3600.0) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (low <= value <= high) or \
            math.isnan(value):
        raise ConfigError(f"{name}={value!r}: pass seconds between {low:g} and {high:g}")
    return float(value)


# -- hooks ------------------------------------------------------------------------------
HOOK_NAMES = hooks.NAMES
HOOK_SETS = hooks.SETS


def parse_hooks(value: str | None, *, name: str = "RTML_HOOKS") -> tuple[str, ...] | None:
    """RTML_HOOKS: unset/"auto" -> what the kernel offers (page_fault_user only where the memcg
    events are missing); "memcg" (the precise set, 6.13+); "lean" (alias "fault": one event per
    fault, and page_alloc for the meter's huge pages: the pre-6.13 set); "all"; or a comma list
    of hook names."""
    value = (value or "").strip()
    if value in ("", "auto"):
        return None
    if value in HOOK_SETS:
        return HOOK_SETS[value]
    names = tuple(v.strip() for v in value.split(",") if v.strip())
    unknown = [n for n in names if n not in HOOK_NAMES]
    if unknown or not names:
        raise ConfigError(
            f"{name}={value!r}: unknown hook {(unknown or [value])[0]!r}; use auto, memcg, lean, all or a comma "
            "list of " + ", ".join(HOOK_NAMES)
        )
    return names


# -- the environment --------------------------------------------------------------------
@dataclass(frozen=True)
class EnvSettings:
    """The default limiter's settings from ``RTML_*`` (unset ones are None)."""

    threshold: float | int | None = None
    metric: str | None = None
    backend: str | None = None
    fail_closed: bool | None = None

    def as_kwargs(self) -> dict[str, object]:
        return {k: v for k, v in self.__dict__.items() if v is not None}


def env_settings(environ: Mapping[str, str] | None = None) -> EnvSettings:
    """RTML_THRESHOLD, RTML_METRIC, RTML_BACKEND, RTML_FAIL_CLOSED, validated."""
    env = os.environ if environ is None else environ
    threshold = metric = backend = None
    fail_closed = None
    if env.get("RTML_THRESHOLD", "").strip():
        threshold = threshold_value(parse_threshold_text(env["RTML_THRESHOLD"]))
    if env.get("RTML_METRIC", "").strip():
        metric = check_metric(env["RTML_METRIC"].strip(), name="RTML_METRIC")
    if env.get("RTML_BACKEND", "").strip():
        backend = check_backend(env["RTML_BACKEND"].strip(), name="RTML_BACKEND")
    if "RTML_FAIL_CLOSED" in env:
        fail_closed = parse_bool(env["RTML_FAIL_CLOSED"], name="RTML_FAIL_CLOSED")
    return EnvSettings(threshold, metric, backend, fail_closed)


def env_fail_closed(environ: Mapping[str, str] | None = None) -> bool:
    """RTML_FAIL_CLOSED alone, for the fail answer when the rest of the environment is bad:
    an unparsable value fails open (the documented default) rather than raise from a check."""
    env = os.environ if environ is None else environ
    try:
        return parse_bool(env.get("RTML_FAIL_CLOSED", ""), name="RTML_FAIL_CLOSED")
    except ConfigError:
        return False


def env_hooks(environ: Mapping[str, str] | None = None) -> tuple[str, ...] | None:
    env = os.environ if environ is None else environ
    return parse_hooks(env.get("RTML_HOOKS"))
