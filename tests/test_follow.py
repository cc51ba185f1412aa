"""A request's account follows it into the threads that work for it (no root: the rusage meter).

The measured figures are real: the helper touches real pages and the kernel counts its faults."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time

import anyio
import anyio.to_thread
import pytest

from rtml_ebpf.admission import follow as _follow
from rtml_ebpf.backends.meter import RUSAGE
from rtml_ebpf.errors import MemoryLimitReached, RequestMemoryExceeded
from rtml_ebpf.relief import set_mmap_threshold

MiB = 1 << 20
PAGE = 4096


def touch(n: int) -> bytearray:
    """Allocate n bytes and touch every page (first touches are what the kernel charges)."""
    buf = bytearray(n)
    for i in range(0, n, PAGE):
        buf[i] = 1
    return buf


def hold_and_free(n: int) -> int:
    buf = touch(n)
    del buf
    return threading.get_native_id()


@pytest.fixture(autouse=True)
def installed() -> None:
    _follow.CURRENT.set(None)  # a ticket another test admitted on this thread and never finished
    # As admission does: large buffers are mapped and unmapped, so each run faults its pages
    # anew (glibc would otherwise serve the second one from the heap the first one left).
    set_mmap_threshold(128 << 10)
    assert "asyncio.to_thread" in _follow.install() and "anyio.to_thread.run_sync" in _follow.install()


def test_asyncio_to_thread_is_charged_to_the_request() -> None:
    acc = _follow.Account(RUSAGE)

    async def request() -> int:
        _follow.CURRENT.set(acc)
        return await asyncio.to_thread(hold_and_free, 40 * MiB)

    helper = asyncio.run(request())
    assert helper != threading.get_native_id()
    assert acc.peak == pytest.approx(40 * MiB, rel=0.1)
    assert not acc.running


def test_anyio_run_sync_is_charged_to_the_request() -> None:
    """What Starlette and FastAPI do with every ``def`` endpoint and dependency."""
    acc = _follow.Account(RUSAGE)

    async def request() -> None:
        _follow.CURRENT.set(acc)
        await anyio.to_thread.run_sync(hold_and_free, 24 * MiB)
        await anyio.to_thread.run_sync(hold_and_free, 8 * MiB)

    anyio.run(request)
    # The rusage meter counts first touches and never frees (its net is its peak), so runs in
    # sequence add up; the kernel-fed meter sees the free between them (tests/root/test_enforce.py).
    assert acc.peak == pytest.approx(32 * MiB, rel=0.1)


def test_outside_a_request_nothing_is_wrapped_or_charged() -> None:
    async def no_request() -> int:
        return await asyncio.to_thread(hold_and_free, MiB)

    assert asyncio.run(no_request()) != threading.get_native_id()
    assert _follow.charged_to_request(hold_and_free) is hold_and_free


def test_an_executor_with_the_requests_context_via_charged_to_request() -> None:
    acc = _follow.Account(RUSAGE)
    _follow.CURRENT.set(acc)
    try:
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            pool.submit(_follow.charged_to_request(hold_and_free), 16 * MiB).result()
    finally:
        _follow.CURRENT.set(None)
    assert acc.peak == pytest.approx(16 * MiB, rel=0.1)


def test_the_requests_own_thread_is_not_metered_twice() -> None:
    acc = _follow.Account(RUSAGE, owner=threading.get_native_id())
    acc.run(hold_and_free, 8 * MiB)
    assert acc.peak == 0 and acc.net == 0


def test_a_running_helper_is_listed_and_can_be_ended() -> None:
    acc = _follow.Account(RUSAGE)
    started = threading.Event()
    outcome: list[str] = []

    def grow_forever() -> None:
        held = []
        started.set()
        while True:
            held.append(touch(MiB))
            time.sleep(0.002)

    def helper() -> None:
        try:
            acc.run(grow_forever)
        except RequestMemoryExceeded:
            outcome.append("ended")

    t = threading.Thread(target=helper)
    t.start()
    assert started.wait(5)
    time.sleep(0.05)
    assert acc.grown() > 0
    idents = acc.threads()
    assert idents == [t.ident]
    assert all(_follow.raise_in_thread(i, RequestMemoryExceeded) for i in idents)
    t.join(5)
    assert outcome == ["ended"] and not acc.running
    assert issubclass(RequestMemoryExceeded, MemoryLimitReached)


def test_no_new_work_starts_for_an_ended_request() -> None:
    acc = _follow.Account(RUSAGE)
    acc.ended = True
    with pytest.raises(RequestMemoryExceeded):
        acc.run(hold_and_free, MiB)


def test_contexts_are_per_request() -> None:
    """Two requests in two tasks: each helper is charged to its own request."""
    a, b = _follow.Account(RUSAGE), _follow.Account(RUSAGE)

    async def request(acc: _follow.Account, n: int) -> None:
        _follow.CURRENT.set(acc)
        await asyncio.to_thread(hold_and_free, n)

    async def both() -> None:
        # Each task runs in a copy of the context it was created in: each request sets its own.
        await asyncio.gather(asyncio.create_task(request(a, 8 * MiB)), asyncio.create_task(request(b, 32 * MiB)))

    asyncio.run(both())
    assert a.peak == pytest.approx(8 * MiB, rel=0.15) and b.peak == pytest.approx(32 * MiB, rel=0.1)


def test_asgiref_sync_to_async_is_charged_to_the_request() -> None:
    """What Django's ASGI handler does with every sync view."""
    from asgiref.sync import sync_to_async

    assert "asgiref.sync.SyncToAsync" in _follow.install()
    acc = _follow.Account(RUSAGE)

    async def request() -> int:
        _follow.CURRENT.set(acc)
        return await sync_to_async(hold_and_free, thread_sensitive=False)(20 * MiB)

    assert asyncio.run(request()) != threading.get_native_id()
    assert acc.peak == pytest.approx(20 * MiB, rel=0.1)
