"""ASGI middleware (Starlette, FastAPI, any ASGI app): 503 before the body is read.

    from starlette.middleware import Middleware
    from rtml_ebpf.asgi import MemoryLimitMiddleware
    app = Starlette(routes=..., middleware=[Middleware(MemoryLimitMiddleware)])

Requests are admitted by memory budget (rtml_ebpf.admission), their estimate scaled by the
body's size (Content-Length, or the bytes read so far when it is chunked). On one event loop
requests share a thread: the middleware drives each request's coroutine step by step and charges
to it what the kernel charged to the thread during its steps (Admission.run_async), and what the
threadpool charged while running its ``def`` endpoints and dependencies (rtml_ebpf.admission.follow). A
request holds its reservation (a learning one, its route's one slot) until the app call returns:
Starlette's BackgroundTasks and Django's response close run after the response's last bytes. A
request the enforcer ends (it overran its reservation while the cgroup neared the OOM killer) gets
503 when its response has not started; after that, its connection is closed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, MutableMapping
from typing import Any

from .admission import Admission, Ticket
from .admission.body import chunked, gated_receive
from .admission.estimator import route_key
from .admission.policy import (
    DEFAULT_EXCLUDE_PATHS,
    ENDED_BODY,
    REJECTION_BODY,
    Policy,
    content_length,
    record_ended,
    record_rejection,
)
from .errors import RequestMemoryExceeded
from .limiter import Limiter
from .orca import HTTP_FORMATS, LoadReporter, check_format
from .wsgi import quiet_ended

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# A 503 sent while the client is still sending its body: the rest is read and dropped, up to these
# bounds, before the response ends. The server closes the connection then (Connection: close), and
# a close with unread bytes makes the kernel send a reset, which a client still sending gets
# instead of the 503 (http.client, requests: 0 of 10 64 MiB chunked uploads saw it).
DRAIN_BYTES = 64 << 20
DRAIN_SECONDS = 10.0  # in all (a loaded 2-core VM took over 2 s to drop 58 MiB: 3 resets in 20)
DRAIN_IDLE = 1.0  # between two pieces of the body: a client that stops sending is not waited for
# A request refused as "learning" (that one is in flight, in any process) waits for it this long,
# trying again every LEARNING_STEP (a waiting coroutine holds no memory to speak of).
LEARNING_WAIT = 0.5
LEARNING_STEP = 0.01
# Where an ended request's exception is logged with its traceback: the servers' error loggers
# (an app's exception), and asyncio's (an exception landing in a transport's write of the request's
# own response: the transport closes that connection and logs "Fatal write error on socket transport").
SERVER_LOGGERS = ("uvicorn.error", "hypercorn.error", "asyncio")


class MemoryLimitMiddleware:
    """Rejects HTTP requests with ``status_code`` (503) and a jittered Retry-After while the
    limiter says the memory limit is reached. Paths in ``exclude_paths`` are never shed;
    other scope types (websocket, lifespan) pass through. ``shed_at``: ``"hard"``, ``"soft"``,
    ``"probabilistic"`` (rising from the soft to the hard level) or ``"stall"`` (the hard level, or
    the cgroup stalling on memory by PSI; cgroup v2). ``load_report``: True or
    ``"text"`` / ``"json"`` adds the ORCA header ``endpoint-load-metrics`` to every response
    (rtml_ebpf.orca); Retry-After follows the measured drain rate where one is known."""

    def __init__(
        self,
        app: ASGIApp,
        limiter: Limiter | None = None,
        *,
        exclude_paths: Iterable[str] = DEFAULT_EXCLUDE_PATHS,
        shed_at: str = "hard",
        retry_after: tuple[int, int] = (1, 5),
        status_code: int = 503,
        admission: bool | Admission = True,
        request_bytes: int | None = None,
        route_costs: Mapping[str, int] | None = None,
        cost_per_byte: float | Mapping[str, float] | None = None,
        load_report: bool | str | None = None,
    ) -> None:
        self.app = app
        self.policy = Policy("asgi", limiter, shed_at=shed_at, exclude=exclude_paths, retry_after=retry_after,
                             admission=admission, request_bytes=request_bytes, route_costs=route_costs,
                             cost_per_byte=cost_per_byte)
        self.report = LoadReporter(limiter, check_format(load_report, HTTP_FORMATS, "text"))
        self.status_code = status_code
        # The server logs a traceback for the RequestMemoryExceeded re-raised once a response has
        # started (it must abort the connection, so it is raised): the enforcer logged one line.
        quiet_ended(None, *map(logging.getLogger, SERVER_LOGGERS))

    @property
    def admission(self) -> Admission | None:
        return self.policy.admission

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            if scope["type"] == "lifespan" and self.policy.admission is not None:
                send = _leaving(send, self.policy.admission)
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        if self.report.fmt is not None:
            send = self._reporting(send)
        length, te = _headers(scope)
        size = None if chunked(te) else content_length(length)  # Transfer-Encoding wins (RFC 9112 6.3)
        has_body = size is None and te is not None or bool(size)
        shed, ticket = await self._admit(path, route_key(scope.get("method", "GET"), path), size, has_body)
        if shed:
            await self._reject(send, self.policy.rejection_body(), receive if has_body else None)
            return
        admission = self.policy.admission
        if ticket is None or admission is None:
            await self.app(scope, receive, send)
            return
        started = replaced = False
        body = _Body(receive) if has_body else None
        if body is not None:
            receive = body.receive

        async def send_tracked(message: Message) -> None:
            nonlocal started, replaced
            if replaced:
                return  # the app's own error response to the exception: ours was sent instead
            if message["type"] == "http.response.start":
                if (ticket.ended or ticket.refused) and not started and int(message.get("status", 200)) >= 500:
                    replaced = True  # a framework turned the exception into its 500: say what happened
                    await self._reject(send, self._refused(ticket), _unread(body))
                    return
                if ticket.pending and not started and not admission.take_slot(ticket):
                    replaced = True  # it answers without its body: it holds its slot now, or is refused
                    await self._reject(send, self._refused(ticket), _unread(body))
                    return
                started = True
            await send(message)

        if te is not None or ticket.pending:
            receive = gated_receive(receive, admission, ticket, sized=size is not None)
        try:
            await admission.run_async(ticket, self.app(scope, receive, send_tracked))  # type: ignore[arg-type]
        except RequestMemoryExceeded:
            if started:
                raise  # the response is under way: the server closes the connection
            if not replaced:
                await self._reject(send, self._refused(ticket), _unread(body))
        finally:
            admission.finish(ticket)

    async def _admit(self, path: str, route: str, size: int | None, body: bool) -> tuple[bool, Ticket | None]:
        """Policy.admit, except that a request refused as "learning" (a learning request is in
        flight in the cgroup, or its route's one guessed request) waits for that one, up to
        LEARNING_WAIT: it holds its slot until its app returns, which may be after it answered
        (BackgroundTasks), and a client's next request must not be refused for it. Counted once,
        as one rejection, when it gives up."""
        policy, adm = self.policy, self.policy.admission
        if adm is None or policy.excluded(path):
            return policy.admit(path, route, size=size, stepped=True, body=body)
        deadline = time.monotonic() + LEARNING_WAIT
        while not policy.door():
            ticket = adm.try_admit(route, size=size, stepped=True, body=body)
            if ticket is not None:
                return False, ticket
            if adm.refusal() != "learning" or time.monotonic() >= deadline:
                break
            adm.learning_retried()
            await asyncio.sleep(LEARNING_STEP)
        record_rejection("asgi")
        return True, None

    def _reporting(self, send: Send) -> Send:
        report = self.report
        report.count()

        async def send_with_report(message: Message) -> None:
            if message["type"] == "http.response.start":
                header = report.header()
                if header is not None:
                    name, value = header
                    value = value if isinstance(value, bytes) else value.encode()
                    message = {**message, "headers": [*message.get("headers", ()), (name.encode(), value)]}
            await send(message)

        return send_with_report

    def _refused(self, ticket: Ticket) -> bytes:
        """What to answer a request stopped after admission: refused as its body grew, or ended."""
        if ticket.refused:  # (a pending request that could not take its slot is ended too: refused)
            record_rejection("asgi")
            return self.policy.rejection_body(ticket)
        record_ended("asgi")
        return ENDED_BODY

    async def _reject(self, send: Send, body: bytes = REJECTION_BODY, unread: Receive | None = None) -> None:
        """503; ``unread``: the request's body is still coming, read and dropped after the 503 is
        out (within DRAIN_BYTES and DRAIN_SECONDS), so the close does not reset it away."""
        headers = [
            (b"content-type", b"text/plain; charset=utf-8"),
            (b"content-length", str(len(body)).encode()),
            (b"retry-after", str(self.report.retry_after(self.policy.retry_after_seconds)).encode()),
            (b"connection", b"close"),
        ]
        await send({"type": "http.response.start", "status": self.status_code, "headers": headers})
        if unread is None:
            await send({"type": "http.response.body", "body": body})
            return
        await send({"type": "http.response.body", "body": body, "more_body": True})
        await _drain(unread)
        await send({"type": "http.response.body", "body": b""})


class _Body:
    """The request's ``receive``, noting when its body has all arrived (or the client left)."""

    __slots__ = ("_receive", "done")

    def __init__(self, receive: Receive) -> None:
        self._receive, self.done = receive, False

    async def receive(self) -> Message:
        message = await self._receive()
        if message.get("type") == "http.disconnect" or not message.get("more_body", False):
            self.done = True
        return message


def _unread(body: _Body | None) -> Receive | None:
    """The raw receive of a body still coming (to drain after a 503), None when it is all in."""
    return None if body is None or body.done else body.receive


async def _drain(receive: Receive) -> None:
    """Read and drop the rest of a request's body, up to DRAIN_BYTES, DRAIN_SECONDS and DRAIN_IDLE; past them
    the server's close may reach the client as a reset (docs/admission.md says when)."""
    deadline, read = time.monotonic() + DRAIN_SECONDS, 0
    try:
        while read <= DRAIN_BYTES:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            message = await asyncio.wait_for(receive(), min(left, DRAIN_IDLE))
            if message.get("type") != "http.request":
                return  # http.disconnect: the client left
            read += len(message.get("body", b""))
            if not message.get("more_body", False):
                return
    except (asyncio.TimeoutError, OSError, RuntimeError):
        return  # (a server that will not give more of the body once the app has answered)


def _leaving(send: Send, admission: Admission) -> Send:
    """The server's shutdown: leave the shared ledger now (the last process out removes its file).
    uvicorn's workers end by re-raising the SIGTERM they caught, so no atexit hook runs there."""

    async def send_leaving(message: Message) -> None:
        if message.get("type") == "lifespan.shutdown.complete":
            admission.close()
        await send(message)

    return send_leaving


def _headers(scope: Scope) -> tuple[bytes | None, bytes | None]:
    """(Content-Length, Transfer-Encoding) of the request, None when absent."""
    length = te = None
    for key, value in scope.get("headers", ()):
        key = key.lower()
        if key == b"content-length":
            length = bytes(value)
        elif key == b"transfer-encoding":
            te = bytes(value)
    return length, te
