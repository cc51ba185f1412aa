"""The request's body as it is read, for the integrations: each read grows the reservation of a
body of unknown size (chunked) and is refused when the grown reservation no longer fits; a request
admitted *pending* (it could only run alone or learning) takes its slot once its body is in, or
sooner: when its app starts the response (the integrations), or when its app grows past what the
body read so far explains (``PendingWatch``: an app that ignores the body and allocates would
otherwise stay pending, its memory in no budget). A pending request that cannot take its slot
then is ended (RequestMemoryExceeded in its thread or at its coroutine's next step: 503).

A refusal raises :class:`BodyRefused` where the app reads (``receive()``, ``wsgi.input.read()``),
before it gets the bytes that did not fit; the integration answers 503 when no response has
started, as for a request the enforcer ended.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, MutableMapping
from typing import TYPE_CHECKING, Any

from ..errors import RequestMemoryExceeded
from .enforce import end

if TYPE_CHECKING:
    from .budget import Admission
    from .ticket import Ticket

Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
log = logging.getLogger("rtml_ebpf")

# Growth a pending request may show before its body is in: the framework's own request objects,
# and the body it buffers (counted twice: bytes as read, and once decoded or copied).
PENDING_SLACK = 1 << 20
PENDING_LOOK = 0.02  # seconds between looks at the pending requests' growth (only while there are some)


def explained(read: int) -> int:
    """Bytes of growth that ``read`` bytes of body explain, for a request still waiting for the rest."""
    return PENDING_SLACK + 2 * read


class _Pending:
    """A pending request as the watch sees it: its admission, its ticket, its body bytes read."""

    __slots__ = ("admission", "ticket", "read")

    def __init__(self, admission: Admission, ticket: Ticket) -> None:
        self.admission, self.ticket, self.read = admission, ticket, 0


class PendingWatch:
    """One thread per process, awake only while pending requests are in flight: a pending request
    whose measured growth passes what its body explains takes its slot (Admission.take_slot), and
    is ended when it cannot. Its growth comes from the request's meter (its thread's or its
    coroutine's steps, and its helper threads'), read without a system call on the eBPF and agent
    meters."""

    def __init__(self) -> None:
        self._mu = threading.Lock()
        self._items: dict[int, _Pending] = {}
        self._some = threading.Event()
        self._pid = 0

    def add(self, admission: Admission, ticket: Ticket) -> _Pending:
        item = _Pending(admission, ticket)
        with self._mu:
            self._items[id(ticket)] = item
            if self._pid != os.getpid():  # first use in this process (a forked worker has no thread)
                self._pid = os.getpid()
                threading.Thread(target=self._run, name="rtml-pending", daemon=True).start()
        self._some.set()
        return item

    def _run(self) -> None:
        while True:
            self._some.wait()
            time.sleep(PENDING_LOOK)
            with self._mu:
                items = list(self._items.values())
            for item in items:
                try:
                    self._look(item)
                except Exception as exc:  # noqa: BLE001 - the watch must outlive any one request
                    log.error("rtml-ebpf: the look at a request waiting for its body failed: %s", exc)
                    self._drop(item)
            with self._mu:
                if not self._items:
                    self._some.clear()

    def _look(self, item: _Pending) -> None:
        ticket = item.ticket
        if ticket.finished or ticket.refused or not ticket.pending:
            self._drop(item)
        elif ticket.grown() > explained(item.read):
            self._drop(item)
            if not item.admission.take_slot(ticket):
                end(ticket)  # it grows without its body and cannot have its slot: 503 before it goes on

    def _drop(self, item: _Pending) -> None:
        with self._mu:
            if self._items.get(id(item.ticket)) is item:
                del self._items[id(item.ticket)]

    def after_fork_in_child(self) -> None:
        self._mu, self._items, self._some, self._pid = threading.Lock(), {}, threading.Event(), 0


PENDING = PendingWatch()
os.register_at_fork(after_in_child=PENDING.after_fork_in_child)


class BodyRefused(RequestMemoryExceeded):
    """The request's body grew past what the memory budget can hold (or, admitted while its body
    was still to come, it could not take its slot once the body was in): answered 503 by the
    integration, not learned from."""


def chunked(transfer_encoding: str | bytes | None) -> bool:
    """A Transfer-Encoding header was sent: then the body is framed by it and any Content-Length
    is to be ignored (RFC 9112 section 6.3), so the body is sized as it is read."""
    return transfer_encoding is not None and len(transfer_encoding.strip()) > 0


def gated_receive(receive: Receive, admission: Admission, ticket: Ticket, sized: bool) -> Receive:
    """ASGI ``receive`` reporting the body as it arrives; ``sized``: its length was declared (only
    its end matters then)."""
    read = 0
    watched = PENDING.add(admission, ticket) if ticket.pending else None

    async def receive_gated() -> Message:
        nonlocal read
        if ticket.refused:
            raise BodyRefused
        message = await receive()
        if message.get("type") == "http.request":
            body = message.get("body")
            if body:
                read += len(body)
                if watched is not None:
                    watched.read = read
                if not sized and not admission.body_read(ticket, read):
                    raise BodyRefused
            if not message.get("more_body", False) and not admission.body_done(ticket):
                raise BodyRefused
        return message

    return receive_gated


class GatedInput:
    """``wsgi.input`` reporting the body as the app reads it. ``length``: the declared
    Content-Length (None: chunked, read to its end)."""

    def __init__(self, stream: Any, admission: Admission, ticket: Ticket, length: int | None) -> None:
        self._stream, self._admission, self._ticket, self._length = stream, admission, ticket, length
        self._read = 0
        self._done = False
        self._watched = PENDING.add(admission, ticket) if ticket.pending else None

    def _saw(self, data: bytes, asked: int | None) -> bytes:
        ticket = self._ticket
        if ticket.refused:
            raise BodyRefused
        if data:
            self._read += len(data)
            if self._watched is not None:
                self._watched.read = self._read
            if self._length is None and not self._admission.body_read(ticket, self._read):
                raise BodyRefused
        end = (not data and asked != 0) or asked is None or asked < 0 or (
            self._length is not None and self._read >= self._length)
        if end and not self._done:
            self._done = True
            if not self._admission.body_done(ticket):
                raise BodyRefused
        return data

    @property
    def done(self) -> bool:
        """The body has been read to its end."""
        return self._done

    def read(self, size: int | None = -1, /) -> bytes:
        data = self._stream.read() if size is None or size < 0 else self._stream.read(size)
        return self._saw(data, size)

    def readline(self, size: int | None = -1, /) -> bytes:
        data = self._stream.readline() if size is None or size < 0 else self._stream.readline(size)
        return self._saw(data, 1)  # an empty line is the end

    def readlines(self, hint: int = -1, /) -> list[bytes]:
        lines = []
        for line in self:
            lines.append(line)
            if 0 < hint <= sum(map(len, lines)):
                break
        return lines

    def __iter__(self) -> Iterator[bytes]:
        while True:
            line = self.readline()
            if not line:
                return
            yield line

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)  # close(), a server's extras
