"""The process-wide default limiter behind ``rtml_ebpf.is_mem_limit_reached()``.

Built on first use from ``configure()`` settings over the ``RTML_*`` environment. The first
call answers from a poll limiter built on the spot (microseconds) and loads eBPF in a
background thread, which swaps in when ready: the caller never waits for a BPF load.

Fork: a child forked while the load runs (gunicorn --preload with a check in the master,
multiprocessing) must not inherit a held lock or wait for a thread it does not have: it
starts over with its own first call. Migration: where the monitor runs (the default has
relief on), the process's memory cgroup is re-read every second; when the process was moved
(systemd, a container runtime), the default is rebuilt for its new cgroup.
"""

from __future__ import annotations

import logging
import os
import threading

from . import _cgroup
from .config import check_backend, check_metric, env_fail_closed, env_settings, parse_bool, parse_threshold
from .errors import RequestMemoryExceeded
from .limiter import Limiter

log = logging.getLogger("rtml_ebpf")

MIGRATION_CHECK_INTERVAL = 1.0

_default: Limiter | None = None
_create_lock = threading.Lock()
_failed = False
_generation = 0
_upgrade_done = threading.Event()
_upgrade_done.set()
_settings: dict[str, object] = {}


def _kwargs() -> dict[str, object]:
    return {**env_settings().as_kwargs(), **_settings}


def _fail_closed() -> bool:
    value = _settings.get("fail_closed")
    return bool(value) if value is not None else env_fail_closed()


def configure(
    *,
    threshold: float | int | None = None,
    metric: str | None = None,
    backend: str | None = None,
    fail_closed: bool | None = None,
) -> None:
    """Set the default limiter's settings (they override the environment) and rebuild it lazily."""
    if threshold is not None:
        parse_threshold(threshold)
    if metric is not None:
        check_metric(metric)
    if backend is not None:
        check_backend(backend)
    if fail_closed is not None:
        fail_closed = parse_bool(fail_closed, name="fail_closed")
    with _create_lock:
        for key, value in (("threshold", threshold), ("metric", metric), ("backend", backend),
                           ("fail_closed", fail_closed)):
            if value is not None:
                _settings[key] = value
    _drop()


def _drop() -> None:
    """Forget the current default (and any build under way); the next call builds anew."""
    global _default, _failed, _generation
    with _create_lock:
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
            _watch_migration()
        return _default


def prepare() -> Limiter | None:
    """Build the default now, the eBPF load included (~100 ms), instead of at the first check.

    The integrations call it when they are built on the default: a server that imports the
    app before forking its workers (gunicorn ``--preload``, uWSGI without lazy-apps) then loads
    the programs once, in the master, and every worker (a restarted one too) inherits one loaded
    object, kernel-fed from its first request. Never raises: a default that cannot be built
    is logged once and the checks fail open (or closed), as for the module-level check.
    """
    if _failed:
        return None
    try:
        return default_limiter()
    except RequestMemoryExceeded:
        raise  # admission's enforcer ending this request, not a default that cannot be built
    except Exception as exc:  # noqa: BLE001 - the same contract as the module-level check
        with _create_lock:
            _give_up(exc)
        return None


def _give_up(exc: BaseException) -> None:
    """With _create_lock held: no default can be built; say why once, answer the fail answer."""
    global _failed
    _failed = True
    log.error("rtml-ebpf: cannot watch memory (%s); is_mem_limit_reached() answers %s", exc, _fail_closed())


def current() -> Limiter | None:
    """The default as it is now, built (poll first) if needed; never raises. Waits only for
    another thread's first build of the poll limiter (milliseconds, never the BPF load):
    admission must not let a burst in unbudgeted while the first request builds it."""
    lim = _default
    if lim is not None or _failed:
        return lim
    if _create_lock.acquire(timeout=2.0):
        try:
            _build_locked()
        finally:
            _create_lock.release()
    return _default


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
    if _failed or not _create_lock.acquire(blocking=False):
        return _fail_closed()
    try:
        lim = _build_locked()
        return _fail_closed() if lim is None else lim.is_mem_limit_reached()
    finally:
        _create_lock.release()


def _build_locked() -> Limiter | None:
    """With _create_lock held: the poll default now, the eBPF one in the background. Logs and
    remembers a failure (bad environment, no cgroup) instead of raising."""
    global _default
    if _default is not None or _failed:
        return _default
    try:
        kwargs = _kwargs()
        if kwargs.get("backend", "auto") == "poll":
            _default = Limiter(**kwargs)  # type: ignore[arg-type]
        else:
            _default = Limiter(**{**kwargs, "backend": "poll"})  # type: ignore[arg-type]
            # Import here, not in the loading thread: a fork while that thread held a module's
            # import lock would leave the child blocked on it for ever (not reset at fork).
            from .backends import ebpf  # noqa: F401

            _upgrade_done.clear()
            threading.Thread(target=_upgrade, args=(kwargs, _generation), name="rtml-ebpf-load",
                             daemon=True).start()
        _watch_migration()
    except RequestMemoryExceeded:
        raise  # (as in prepare: never a reason to give up on the default)
    except Exception as exc:  # noqa: BLE001 - never raise from the check
        _give_up(exc)
    return _default


def _upgrade(kwargs: dict[str, object], generation: int) -> None:
    """Builds the eBPF (or auto) default off the request path, then swaps it in."""
    global _default
    done = _upgrade_done  # a fork in the child replaces the module's event: set ours only
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
        done.set()


# -- migration ---------------------------------------------------------------------------
def _watch_migration() -> None:
    from ._monitor import monitor

    monitor().every(MIGRATION_CHECK_INTERVAL, check_migration)


def check_migration() -> bool:
    """Rebuild the default if this process now lives in another memory cgroup. True if it did."""
    lim = _default
    if lim is None:
        return False
    try:
        now = _cgroup.find_process_cgroup().cgroup_id
    except Exception:  # noqa: BLE001 - keep the current one; the next look may succeed
        return False
    if now == lim.cgroup_id:
        return False
    log.warning("rtml-ebpf: this process moved out of memory cgroup %s; the default limiter follows it",
                lim.cgroup.directory)
    _drop()
    return True


def _after_fork_in_child() -> None:
    global _create_lock, _upgrade_done, _default, _generation
    _create_lock = threading.Lock()
    if not _upgrade_done.is_set():
        # The parent's load was under way: its thread is not here. Start over on first use.
        _upgrade_done = threading.Event()
        _upgrade_done.set()
        _default = None
        _generation += 1


os.register_at_fork(after_in_child=_after_fork_in_child)
