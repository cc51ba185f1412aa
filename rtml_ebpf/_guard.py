"""The decorator and the asyncio helper: the check where there is no middleware."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import Any, TypeVar, overload

from .admission.policy import Policy
from .errors import ConfigError, MemoryLimitReached
from .limiter import Level, Limiter

F = TypeVar("F", bound=Callable[..., Any])
_CO_COROUTINE = 0x80  # inspect.CO_COROUTINE, without importing inspect (and asyncio) at start-up


def _is_coroutine_function(f: Callable[..., Any]) -> bool:
    code = getattr(getattr(f, "__func__", f), "__code__", None)
    return code is not None and bool(code.co_flags & _CO_COROUTINE)


@overload
def guard(func: F) -> F: ...


@overload
def guard(*, limiter: Limiter | None = None, shed_at: str = "hard") -> Callable[[F], F]: ...


def guard(func: F | None = None, *, limiter: Limiter | None = None, shed_at: str = "hard") -> Any:
    """Raise :class:`rtml_ebpf.MemoryLimitReached` instead of running ``func`` while the limit is
    reached. Works on plain and ``async`` functions; ``@guard`` or ``@guard(limiter=..., shed_at=...)``."""
    policy = Policy("guard", limiter, shed_at=shed_at, exclude=(), admission=False)

    def decorate(f: F) -> F:
        name = getattr(f, "__qualname__", repr(f))

        def refuse() -> MemoryLimitReached:
            return MemoryLimitReached(f"{name}: memory limit reached; retry later")

        if _is_coroutine_function(f):
            @functools.wraps(f)
            async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
                if policy.should_shed():
                    raise refuse()
                return await f(*args, **kwargs)

            return async_wrapper  # type: ignore[return-value]

        @functools.wraps(f)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if policy.should_shed():
                raise refuse()
            return f(*args, **kwargs)

        return wrapper  # type: ignore[return-value]

    return decorate(func) if func is not None else decorate


async def wait_for_headroom(
    timeout: float | None = None, *, limiter: Limiter | None = None, level: Level = Level.HARD,
    interval: float = 0.005,
) -> bool:
    """Wait until the limiter is below ``level`` (HARD: the limit check clears; SOFT: back to OK).

    Returns True once there is headroom, False when ``timeout`` seconds passed first. Checks
    every ``interval`` seconds (each check is a memory read on the eBPF backend).
    """
    import asyncio

    if timeout is not None and timeout < 0:
        raise ConfigError(f"timeout={timeout!r}: pass seconds >= 0 or None to wait indefinitely")
    if interval <= 0:
        raise ConfigError(f"interval={interval!r}: pass seconds > 0")
    if limiter is None:
        from ._default import default_limiter

        lim = default_limiter()
    else:
        lim = limiter
    deadline = None if timeout is None else time.monotonic() + timeout
    while lim.level() >= level:
        if deadline is not None and time.monotonic() >= deadline:
            return False
        await asyncio.sleep(interval)
    return True
