"""rtml-ebpf: a real-time memory limit check for Python services, fed by the kernel.

    import rtml_ebpf
    if rtml_ebpf.is_mem_limit_reached():
        return 503

The process-wide default limiter watches this process's memory cgroup. Its
settings come from the environment (RTML_THRESHOLD, RTML_METRIC, RTML_BACKEND,
RTML_FAIL_CLOSED) or from :func:`configure`.
"""

from __future__ import annotations

import logging
import os
import threading

from .errors import (
    CgroupNotFound,
    ConfigError,
    LoadError,
    MemoryLimitReached,
    NotSupported,
    PermissionDenied,
    RtmlError,
)
from .limiter import Level, Limiter, Stats, check_backend, check_metric, parse_threshold, parse_threshold_text

__all__ = [
    "CgroupNotFound",
    "ConfigError",
    "Level",
    "Limiter",
    "LoadError",
    "MemoryLimitReached",
    "NotSupported",
    "PermissionDenied",
    "RtmlError",
    "Stats",
    "configure",
    "default_limiter",
    "guard",
    "is_mem_limit_reached",
    "wait_for_headroom",
]
__version__ = "0.1.0"

from ._guard import guard, wait_for_headroom  # noqa: E402 - needs Limiter above

log = logging.getLogger("rtml_ebpf")

_default: Limiter | None = None
_create_lock = threading.Lock()
_failed = False
_generation = 0
_upgrade_done = threading.Event()
_upgrade_done.set()
_settings: dict[str, object] = {}


def _env_settings() -> dict[str, object]:
    out: dict[str, object] = {}
    if os.environ.get("RTML_THRESHOLD"):
        t = parse_threshold_text(os.environ["RTML_THRESHOLD"])
        out["threshold"] = t.nbytes if t.nbytes is not None else (t.ppm or 0) / 1_000_000
    if os.environ.get("RTML_METRIC"):
        out["metric"] = check_metric(os.environ["RTML_METRIC"].strip())
    if os.environ.get("RTML_BACKEND"):
        out["backend"] = check_backend(os.environ["RTML_BACKEND"].strip())
    if os.environ.get("RTML_FAIL_CLOSED"):
        out["fail_closed"] = os.environ["RTML_FAIL_CLOSED"].strip().lower() in ("1", "true", "yes", "on")
    return out


def _fail_closed() -> bool:
    value = _settings.get("fail_closed")
    if value is None:
        value = os.environ.get("RTML_FAIL_CLOSED", "").strip().lower() in ("1", "true", "yes", "on")
    return bool(value)


def configure(
    *,
    threshold: float | int | None = None,
    metric: str | None = None,
    backend: str | None = None,
    fail_closed: bool | None = None,
) -> None:
    """Set the default limiter's settings (they override the environment) and rebuild it lazily."""
    global _default, _failed, _generation
    if threshold is not None:
        parse_threshold(threshold)
    if metric is not None:
        check_metric(metric)
    if backend is not None:
        check_backend(backend)
    with _create_lock:
        for key, value in (("threshold", threshold), ("metric", metric), ("backend", backend),
                           ("fail_closed", fail_closed)):
            if value is not None:
                _settings[key] = value
        old, _default, _failed = _default, None, False
        _generation += 1  # a build still under way for the old settings is dropped
        _upgrade_done.set()
    if old is not None:
        old.close()


def default_limiter() -> Limiter:
    """The process-wide limiter behind :func:`is_mem_limit_reached` (built if needed; may raise).

    Waits for the eBPF limiter when one is being built in the background.
    """
    global _default
    _upgrade_done.wait(timeout=30)
    with _create_lock:
        if _default is None:
            _default = Limiter(**_kwargs())  # type: ignore[arg-type]
        return _default


def _kwargs() -> dict[str, object]:
    return {**_env_settings(), **_settings}


def is_mem_limit_reached() -> bool:
    """True when this process's memory cgroup is at or over the default threshold.

    Never raises and never blocks. The first call answers from a poll limiter it builds from
    the cgroup files (microseconds) and starts building the eBPF one in the background (the BPF
    load takes about 100 ms); the eBPF one takes over when ready. A thread calling while the
    first call is under way gets the fail answer. If nothing can be built the error is logged
    once and every call answers False, or True with RTML_FAIL_CLOSED=1 / configure(fail_closed=True).
    """
    lim = _default
    if lim is not None:
        return lim.is_mem_limit_reached()
    return _first_call()


def _first_call() -> bool:
    global _default, _failed
    if _failed or not _create_lock.acquire(blocking=False):
        return _fail_closed()
    try:
        if _default is None:
            kwargs = _kwargs()
            wanted = kwargs.get("backend", "auto")
            if wanted == "poll":
                _default = Limiter(**kwargs)  # type: ignore[arg-type]
            else:
                _default = Limiter(**{**kwargs, "backend": "poll"})  # type: ignore[arg-type]
                _upgrade_done.clear()
                threading.Thread(target=_upgrade, args=(kwargs, _generation), name="rtml-ebpf-load",
                                 daemon=True).start()
        return _default.is_mem_limit_reached()
    except Exception as exc:  # noqa: BLE001 - never raise from the check
        _failed = True
        log.error("rtml-ebpf: cannot watch memory (%s); is_mem_limit_reached() answers %s", exc, _fail_closed())
        return _fail_closed()
    finally:
        _create_lock.release()


def _upgrade(kwargs: dict[str, object], generation: int) -> None:
    """Builds the eBPF (or auto) default off the request path, then swaps it in."""
    global _default
    try:
        try:
            better = Limiter(**kwargs)  # type: ignore[arg-type]
        except Exception as exc:  # noqa: BLE001 - keep the poll limiter, say why once
            log.error("rtml-ebpf: backend=%r failed (%s); the default limiter keeps polling the cgroup files",
                      kwargs.get("backend", "auto"), exc)
            return
        with _create_lock:
            if generation != _generation or _default is None:
                stale: Limiter | None = better  # configure() ran meanwhile
            else:
                stale, _default = _default, better
        if stale is not None:
            stale.close()
    finally:
        _upgrade_done.set()
