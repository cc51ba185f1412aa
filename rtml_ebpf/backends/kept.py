"""Checks kept from an earlier backend follow the Limiter's current one.

``check = lim.is_mem_limit_reached`` is bound at construction by the middlewares (the door
check), ``guard(limiter=lim)`` and users. On a page-backed backend it is a C read of one byte
of that backend's page. When the Limiter leaves the backend (the node agent lost its
programs: kill -9 of an unpinned agent, a restart with another --max-cgroups) the page is
replaced in place by a private one holding the fail answer, so the kept check never reads a
page lent to another cgroup; but with fail-open that answer is "not reached" for good, at any
usage, even after the Limiter is back on the agent (issue 21, item 7).

So the Limiter keeps a writer for each such page and, every look of its monitor (50 ms),
writes its current answer there: a kept check lags the Limiter's own by at most one look,
costs nothing more on the hot path (the same one-byte read), never raises and never blocks.
When the Limiter is closed they get the fail answer, as documented for closed Limiters.
"""

from __future__ import annotations

from collections.abc import Callable

MAX_KEPT = 64  # pages kept writable per Limiter: one per loss of the agent; older ones go


class KeptChecks:
    __slots__ = ("_writers",)

    def __init__(self) -> None:
        self._writers: list[Callable[[bool], None]] = []

    def keep(self, backend: object, handle: object, answer: bool) -> None:
        """After ``handle`` of ``backend`` was removed: keep its page following our answer."""
        make = getattr(backend, "kept_writer", None)
        writer = make(handle) if make is not None else None
        if writer is not None:
            writer(answer)
            self._writers.append(writer)
            del self._writers[:-MAX_KEPT]

    def mirror(self, answer: bool) -> None:
        for write in self._writers:
            write(answer)

    def __bool__(self) -> bool:
        return bool(self._writers)

    def release(self, fail_answer: bool) -> None:
        """The Limiter is closed: kept checks answer the fail answer from now on."""
        self.mirror(fail_answer)
        self._writers.clear()
