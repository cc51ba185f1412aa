"""The asyncio step driver and the enforcer's ``end`` (adversarial review D10), on a real event
loop with real tickets: a request ended while at rest in an await is interrupted at once (not at
its next step, which may be seconds away) with RequestMemoryExceeded, its task is not left
cancelling, and what its frames held is freed without a garbage collection; a real cancellation
still passes as one; a step running on the loop is seen growing while it runs."""

from __future__ import annotations

import asyncio
import gc
import threading
import time
import weakref

import pytest

from rtml_ebpf.admission.enforce import end
from rtml_ebpf.admission.stepped import Stepped
from rtml_ebpf.admission.ticket import Ticket
from rtml_ebpf.backends.meter import RUSAGE
from rtml_ebpf.errors import RequestMemoryExceeded


class Held:
    """Stands for what a request's frames hold (a weakref tells when it is freed)."""


def ticket() -> Ticket:
    return Ticket("GET /x", 1 << 20, 0, 0, True)


def test_an_ended_request_at_rest_is_interrupted_now_and_freed_without_gc() -> None:
    refs: list[weakref.ref[Held]] = []
    seen: list[type[BaseException]] = []  # types: an exception kept would keep its frames

    async def handler() -> None:
        held = Held()
        refs.append(weakref.ref(held))
        try:
            await asyncio.sleep(30)
        except BaseException as exc:
            seen.append(type(exc))
            raise

    async def main() -> tuple[float, int, bool]:
        t = ticket()
        loop_task = asyncio.current_task()
        assert loop_task is not None
        threading.Timer(0.05, end, args=(t,)).start()  # the enforcer's thread
        t0 = time.monotonic()
        with pytest.raises(RequestMemoryExceeded):
            await Stepped(handler(), t, RUSAGE)
        took = time.monotonic() - t0
        # Task.cancelling() is 3.11+ (with uncancel(), which the driver calls where it exists)
        cancelling = loop_task.cancelling() if hasattr(loop_task, "cancelling") else 0
        return took, cancelling, refs[0]() is None

    gc.disable()
    try:
        took, cancelling, freed = asyncio.run(main())
    finally:
        gc.enable()
    assert took < 1.0, took  # not the sleep's 30 s
    assert seen == [RequestMemoryExceeded], seen  # the handler never saw a cancel
    assert cancelling == 0  # our cancel was taken back: asyncio.timeout and TaskGroup still work
    assert freed  # no cycle through the driver's frame


def test_a_real_cancellation_still_passes_as_one() -> None:
    async def main() -> None:
        task = asyncio.ensure_future(Stepped(asyncio.sleep(30), ticket(), RUSAGE))
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())


def test_a_running_step_is_seen_growing_and_ended_in_the_loop_thread() -> None:
    grown: list[int] = []

    async def handler(t: Ticket) -> None:
        held = []
        for _ in range(64):  # 64 MiB with no await: one step
            buf = bytearray(1 << 20)
            buf[::4096] = b"\x01" * 256
            held.append(buf)
            grown.append(t.grown())
            if len(held) == 32:
                end(t)  # as the enforcer does, from here for the test: the step is running
        await asyncio.sleep(0)

    async def main() -> None:
        t = ticket()
        with pytest.raises(RequestMemoryExceeded):
            await Stepped(handler(t), t, RUSAGE)
        assert not t.account.running  # the loop's thread left the account with its step

    asyncio.run(main())
    assert grown[31] >= 24 << 20, grown[31]  # seen while the step ran (RUSAGE counts first touches)
    assert len(grown) < 64, len(grown)  # the raise landed in the step, not after it
