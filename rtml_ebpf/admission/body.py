"""The request's body as it is read, for the integrations: each read grows the reservation of a
body of unknown size (chunked) and is refused when the grown reservation no longer fits; a request
admitted *pending* (it could only run alone or learning) takes its slot once its body is in.

A refusal raises :class:`BodyRefused` where the app reads (``receive()``, ``wsgi.input.read()``),
before it gets the bytes that did not fit; the integration answers 503 when no response has
started, as for a request the enforcer ended.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator, MutableMapping
from typing import TYPE_CHECKING, Any

from ..errors import RequestMemoryExceeded

if TYPE_CHECKING:
    from .budget import Admission
    from .ticket import Ticket

Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]


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

    async def receive_gated() -> Message:
        nonlocal read
        if ticket.refused:
            raise BodyRefused
        message = await receive()
        if message.get("type") == "http.request":
            body = message.get("body")
            if body and not sized:
                read += len(body)
                if not admission.body_read(ticket, read):
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

    def _saw(self, data: bytes, asked: int | None) -> bytes:
        ticket = self._ticket
        if ticket.refused:
            raise BodyRefused
        if data:
            self._read += len(data)
            if self._length is None and not self._admission.body_read(ticket, self._read):
                raise BodyRefused
        end = (not data and asked != 0) or asked is None or asked < 0 or (
            self._length is not None and self._read >= self._length)
        if end and not self._done:
            self._done = True
            if not self._admission.body_done(ticket):
                raise BodyRefused
        return data

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
