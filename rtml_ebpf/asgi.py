"""ASGI middleware (Starlette, FastAPI, any ASGI app): 503 before the body is read.

    from starlette.middleware import Middleware
    from rtml_ebpf.asgi import MemoryLimitMiddleware
    app = Starlette(routes=..., middleware=[Middleware(MemoryLimitMiddleware)])
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any

from ._shed import DEFAULT_EXCLUDE_PATHS, REJECTION_BODY, Policy
from .limiter import Limiter

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]



class MemoryLimitMiddleware:
    """Rejects HTTP requests with ``status_code`` (503) and a jittered Retry-After while the
    limiter says the memory limit is reached. Paths in ``exclude_paths`` are never shed;
    other scope types (websocket, lifespan) pass through. ``shed_at``: ``"hard"``, ``"soft"``
    or ``"probabilistic"`` (rising from the soft to the hard level)."""

    def __init__(
        self,
        app: ASGIApp,
        limiter: Limiter | None = None,
        *,
        exclude_paths: Iterable[str] = DEFAULT_EXCLUDE_PATHS,
        shed_at: str = "hard",
        retry_after: tuple[int, int] = (1, 5),
        status_code: int = 503,
    ) -> None:
        self.app = app
        self.policy = Policy("asgi", limiter, shed_at=shed_at, exclude=exclude_paths, retry_after=retry_after)
        self.status_code = status_code

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.policy.should_shed(scope.get("path", "")):
            await self.app(scope, receive, send)
            return
        headers = [
            (b"content-type", b"text/plain; charset=utf-8"),
            (b"content-length", str(len(REJECTION_BODY)).encode()),
            (b"retry-after", str(self.policy.retry_after_seconds()).encode()),
            (b"connection", b"close"),
        ]
        await send({"type": "http.response.start", "status": self.status_code, "headers": headers})
        await send({"type": "http.response.body", "body": REJECTION_BODY})
