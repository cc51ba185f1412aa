"""WSGI middleware (Flask, Django, any WSGI app): 503 before the app runs.

    from rtml_ebpf.wsgi import MemoryLimitMiddleware
    app.wsgi_app = MemoryLimitMiddleware(app.wsgi_app)      # Flask
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from ._shed import DEFAULT_EXCLUDE_PATHS, REJECTION_BODY, Policy
from .limiter import Limiter

StartResponse = Callable[..., Any]
WSGIApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]

REASONS = {503: "Service Unavailable", 429: "Too Many Requests"}


class MemoryLimitMiddleware:
    """The WSGI twin of :class:`rtml_ebpf.asgi.MemoryLimitMiddleware`, same arguments."""

    def __init__(
        self,
        app: WSGIApp,
        limiter: Limiter | None = None,
        *,
        exclude_paths: Iterable[str] = DEFAULT_EXCLUDE_PATHS,
        shed_at: str = "hard",
        retry_after: tuple[int, int] = (1, 5),
        status_code: int = 503,
    ) -> None:
        self.app = app
        self.policy = Policy("wsgi", limiter, shed_at=shed_at, exclude=exclude_paths, retry_after=retry_after)
        self.status = f"{status_code} {REASONS.get(status_code, 'Rejected')}"

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        if not self.policy.should_shed(environ.get("PATH_INFO", "")):
            return self.app(environ, start_response)
        start_response(self.status, [
            ("Content-Type", "text/plain; charset=utf-8"),
            ("Content-Length", str(len(REJECTION_BODY))),
            ("Retry-After", str(self.policy.retry_after_seconds())),
        ])
        return [REJECTION_BODY]
