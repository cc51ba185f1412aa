"""A request's memory, charged for every thread that works for it.

The kernel meters threads (``rtml_ebpf.backends.meter``): a request admitted on one thread and served on another is
measured on the wrong one. That is the common case, not an edge: FastAPI and Starlette run every
``def`` endpoint and ``def`` dependency in anyio's threadpool, Django runs its sync views through
asgiref, and services hand work to ``asyncio.to_thread``. Each of these copies the caller's
``contextvars`` into the worker, so the request's :class:`Account` travels in a context variable,
and the entry points that hand work to a thread are wrapped (:func:`install`) so the worker
measures itself while it runs for the request and adds what it charged to the account.

Wrapped, only while a request's account is in the context (anything else passes straight through):
``anyio.to_thread.run_sync`` (Starlette's ``run_in_threadpool``, FastAPI's sync endpoints and
dependencies), ``asyncio.to_thread``, and asgiref's ``SyncToAsync`` (Django). Work submitted any
other way is charged with :func:`charged_to_request` (``executor.submit(charged_to_request(fn))``).

A running helper thread is also listed on the account, so the enforcer (``_enforce``) can raise
in it, and the budget sees its growth while it runs (:meth:`Account.grown`).
"""

from __future__ import annotations

import contextvars
import copy
import ctypes
import functools
import importlib
import logging
import sys
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from ..backends.meter import Meter
from .forks import native_id

log = logging.getLogger("rtml_ebpf")
T = TypeVar("T")


class Account:
    """What the helper threads of one request charged (its own thread is metered by its ticket)."""

    __slots__ = ("meter", "owner", "lock", "running", "net", "peak", "ended", "wake")

    def __init__(self, meter: Meter, owner: int = 0) -> None:
        self.meter = meter
        self.owner = owner  # native id of the request's own thread (0: asyncio, stepped)
        self.lock = threading.Lock()
        self.running: dict[int, tuple[int, int]] = {}  # native tid -> (Python ident, net bytes at entry)
        self.net = 0  # bytes still charged from finished helper runs
        self.peak = 0  # the most the helpers held at once, as far as runs in sequence tell
        self.ended = False  # the enforcer ended the request: no new work starts for it
        # asyncio: interrupts the request's await from any thread (admission/stepped.py); None
        # while no step driver waits for it
        self.wake: Callable[[], object] | None = None

    def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Call ``fn`` on this thread, charging what it allocates to the request."""
        tid = native_id()
        if tid == self.owner or tid in self.running:
            return fn(*args, **kwargs)  # the request's own thread, or nested: already metered
        from ..errors import RequestMemoryExceeded

        if self.ended:
            raise RequestMemoryExceeded("the request was ended to keep its cgroup from the OOM killer")
        meter = self.meter
        net0 = meter.begin()
        with self.lock:
            self.running[tid] = (threading.get_ident(), net0)
        try:
            return fn(*args, **kwargs)
        finally:
            net1, peak1 = meter.read()
            with self.lock:
                # net before the pop: grown() reads net without the lock once running is empty
                self.peak = max(self.peak, self.net + (peak1 - net0))
                self.net += net1 - net0
                self.running.pop(tid, None)
            # The enforcer raises only in threads listed in running, under the lock; one raised
            # just before we left would fire in anyio's or asyncio's worker loop, not in the
            # request's code: drop it here, where it is still ours.
            clear_async_exception(threading.get_ident())

    def grown(self) -> int:
        """Bytes the helpers hold now: finished runs plus the growth of those still running."""
        if not self.running:
            return self.net  # most requests hand nothing to a thread: no lock per look
        with self.lock:
            running = list(self.running.items())
            total = self.net
        for tid, (_, net0) in running:
            now = self.meter.net_of(tid)
            if now is not None:
                total += now - net0
        return total

    def threads(self) -> list[int]:
        """Python idents of the helper threads running for the request now."""
        with self.lock:
            return [ident for ident, _ in self.running.values()]


CURRENT: contextvars.ContextVar[Account | None] = contextvars.ContextVar("rtml_ebpf_request", default=None)


def charged_to_request(fn: Callable[..., T]) -> Callable[..., T]:
    """``fn``, charging what it allocates to the request being served where this is called
    (unchanged outside a request). For work handed to a thread some other way than the wrapped
    entry points: ``executor.submit(rtml_ebpf.charged_to_request(fn), ...)``."""
    account = CURRENT.get()
    return fn if account is None else functools.partial(account.run, fn)


# -- the entry points that hand work to a thread --------------------------------------------------
_installed: set[str] = set()
_install_lock = threading.Lock()


def install() -> list[str]:
    """Wrap the entry points whose libraries are imported or importable; idempotent. Returns the
    names wrapped so far."""
    with _install_lock:
        for name, patch in (("asyncio.to_thread", _patch_asyncio), ("anyio.to_thread.run_sync", _patch_anyio),
                            ("asgiref.sync.SyncToAsync", _patch_asgiref)):
            if name in _installed:
                continue
            try:
                if patch():
                    _installed.add(name)
            except Exception as exc:  # noqa: BLE001 - a library we cannot wrap is only not followed
                log.warning("rtml-ebpf: admission cannot follow requests into %s (%s); its work is not charged "
                            "to the request", name, exc)
        return sorted(_installed)


def _patch_asyncio() -> bool:
    import asyncio
    import asyncio.threads

    original: Any = asyncio.threads.to_thread
    if getattr(original, "_rtml_follow", False):
        return True

    @functools.wraps(original)
    async def to_thread(func: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        return await original(charged_to_request(func), *args, **kwargs)

    to_thread._rtml_follow = True  # type: ignore[attr-defined]
    setattr(asyncio.threads, "to_thread", to_thread)  # noqa: B010 - replacing a library's function
    setattr(asyncio, "to_thread", to_thread)  # noqa: B010
    return True


def _patch_anyio() -> bool:
    try:
        import anyio.to_thread
    except ImportError:
        return False
    original: Any = anyio.to_thread.run_sync
    if getattr(original, "_rtml_follow", False):
        return True

    @functools.wraps(original)
    async def run_sync(func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return await original(charged_to_request(func), *args, **kwargs)

    run_sync._rtml_follow = True  # type: ignore[attr-defined]
    setattr(anyio.to_thread, "run_sync", run_sync)  # noqa: B010 - replacing a library's function
    return True


def _patch_asgiref() -> bool:
    """asgiref (Django's sync views) runs ``self.func`` in a worker thread inside a copy of the
    caller's context; the call is wrapped where the caller's context is still current (its
    ``__call__``): a shallow copy of the wrapper whose ``func`` is charged to the request."""
    if "asgiref.sync" not in sys.modules:
        try:
            importlib.import_module("asgiref.sync")
        except ImportError:
            return False
    cls: Any = sys.modules["asgiref.sync"].SyncToAsync
    original = cls.__call__
    if getattr(original, "_rtml_follow", False):
        return True

    @functools.wraps(original)
    async def call(self: Any, *args: Any, **kwargs: Any) -> Any:
        account = CURRENT.get()
        func = getattr(self, "func", None)
        if account is None or func is None:
            return await original(self, *args, **kwargs)
        charged = copy.copy(self)
        charged.func = functools.partial(account.run, func)
        return await original(charged, *args, **kwargs)

    call._rtml_follow = True  # type: ignore[attr-defined]
    cls.__call__ = call
    return True


# -- raising in another thread ------------------------------------------------------------------
# One foreign function (pythonapi hands out one object per name), called with a py_object to
# raise and with NULL to clear.
_set_async_exc = ctypes.pythonapi.PyThreadState_SetAsyncExc
_set_async_exc.restype = ctypes.c_int


def raise_in_thread(ident: int, exc_type: type[BaseException]) -> bool:
    """Raise ``exc_type`` in the Python thread ``ident`` at its next bytecode. A thread inside
    one long C call (one allocation of everything at once) sees it only when the call returns."""
    return bool(_set_async_exc(ctypes.c_ulong(ident), ctypes.py_object(exc_type)) == 1)


def clear_async_exception(ident: int) -> None:
    """Drop an exception raised in thread ``ident`` that has not fired yet."""
    _set_async_exc(ctypes.c_ulong(ident), None)
