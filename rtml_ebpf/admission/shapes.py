"""Shapes of requests other than one thread from admission to finish: a request admitted on one
thread and run on another (a gRPC pool thread), and an asyncio request metered step by step. A
mixin of :class:`~rtml_ebpf.admission.budget.Admission`."""

from __future__ import annotations

import threading
from collections.abc import Awaitable, Coroutine
from typing import Any, TypeVar

from . import follow as _follow
from . import forks
from .stepped import Stepped
from .ticket import Ticket

T = TypeVar("T")


class Shapes:
    def bind(self, ticket: Ticket) -> None:
        """The thread that runs an admitted request (admitted elsewhere with ``bind=False``)."""
        if ticket.stepped or ticket.tid:
            return
        ticket.net0 = ticket.meter.begin()
        with ticket.account.lock:  # the enforcer reads tid/ident under it
            ticket.tid = ticket.account.owner = forks.native_id()
            ticket.ident = threading.get_ident()
        _follow.CURRENT.set(ticket.account)

    def run_async(self, ticket: Ticket, awaitable: Coroutine[Any, Any, T]) -> Awaitable[T]:
        """Wrap a request's coroutine so each of its steps is metered to ``ticket``."""
        return Stepped(awaitable, ticket, ticket.meter)
