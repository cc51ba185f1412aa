"""ASGI middleware (Starlette, FastAPI, any ASGI app): 503 before the body is read.

    from starlette.middleware import Middleware
    from rtml_ebpf.asgi import MemoryLimitMiddleware
    app = Starlette(routes=..., middleware=[Middleware(MemoryLimitMiddleware)])

Requests are admitted by memory budget (rtml_ebpf.admission). On one event loop requests
share a thread: the middleware drives each request's coroutine step by step and charges to
it what the kernel charged to the thread during its steps (Admission.run_async).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Mapping, MutableMapping
from typing import Any

from ._estimator import route_key
from ._shed import DEFAULT_EXCLUDE_PATHS, REJECTION_BODY, Policy
from .admission import Admission
from .limiter import Limiter
from .orca import HTTP_FORMATS, LoadReporter, check_format

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class MemoryLimitMiddleware:
    """Rejects HTTP requests with ``status_code`` (503) and a jittered Retry-After while the
    limiter says the memory limit is reached. Paths in ``exclude_paths`` are never shed;
    other scope types (websocket, lifespan) pass through. ``shed_at``: ``"hard"``, ``"soft"``
    or ``"probabilistic"`` (rising from the soft to the hard level). ``load_report``: True or
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
        load_report: bool | str | None = None,
    ) -> None:
        self.app = app
        self.policy = Policy("asgi", limiter, shed_at=shed_at, exclude=exclude_paths, retry_after=retry_after,
                             admission=admission, request_bytes=request_bytes, route_costs=route_costs)
        self.report = LoadReporter(limiter, check_format(load_report, HTTP_FORMATS, "text"))
        self.status_code = status_code

    @property
    def admission(self) -> Admission | None:
        return self.policy.admission

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        if self.report.fmt is not None:
            send = self._reporting(send)
        shed, ticket = self.policy.admit(path, route_key(scope.get("method", "GET"), path), stepped=True)
        if shed:
            await self._reject(send)
            return
        admission = self.policy.admission
        if ticket is None or admission is None:
            await self.app(scope, receive, send)
            return
        try:
            await admission.run_async(ticket, self.app(scope, receive, send))  # type: ignore[arg-type]
        finally:
            admission.finish(ticket)

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

    async def _reject(self, send: Send) -> None:
        headers = [
            (b"content-type", b"text/plain; charset=utf-8"),
            (b"content-length", str(len(REJECTION_BODY)).encode()),
            (b"retry-after", str(self.report.retry_after(self.policy.retry_after_seconds)).encode()),
            (b"connection", b"close"),
        ]
        await send({"type": "http.response.start", "status": self.status_code, "headers": headers})
        await send({"type": "http.response.body", "body": REJECTION_BODY})
