"""The services users write next, each with the middleware added exactly as the README shows and
nothing else (RTML_DEMO_GUARD=none leaves it out):

    uvicorn --workers 2 rtml_ebpf.demo.userapps:fastapi_def      # FastAPI, sync ``def`` endpoints
    uvicorn --workers 2 rtml_ebpf.demo.userapps:django_sync      # Django ASGI, a sync view
    gunicorn --preload -w 4 -k gthread --threads 8 rtml_ebpf.demo.userapps:upload   # Flask uploads

- ``fastapi_def``: ``GET /work`` is a plain ``def`` endpoint, so FastAPI runs it in anyio's
  threadpool: it builds RTML_DEMO_PAYLOAD_MIB (24) MiB and holds it RTML_DEMO_HOLD (0.3) s.
- ``django_sync``: ``GET /work``, the same work in a plain (sync) Django view, which Django's ASGI
  handler runs through asgiref's ``sync_to_async`` in a worker thread.
- ``upload``: ``POST /upload`` decodes its body into 32 times its size (image, PDF or JSON work
  looks like this), holds it, answers. ``POST /overrun`` is declared to cost RTML_DEMO_OVERRUN_MIB
  (8) MiB and allocates ten times that, 1 MiB at a time: the estimate is wrong, on purpose.
"""

from __future__ import annotations

import functools
import time
from typing import Any

from .app import CHUNK, GUARD, HOLD, PAGE, admission_stats, build_payload

DECODE_FACTOR = 32
_ONES = b"\x01" * (CHUNK // PAGE)


def _overrun_mib() -> int:
    import os

    return int(os.environ.get("RTML_DEMO_OVERRUN_MIB", "8"))


def decode(body: bytes) -> list[bytearray]:
    """DECODE_FACTOR x the body, every page touched, in 1 MiB pieces."""
    need = len(body) * DECODE_FACTOR
    out = []
    while need > 0:
        buf = bytearray(min(CHUNK, need))
        buf[::PAGE] = _ONES[: (len(buf) + PAGE - 1) // PAGE]
        out.append(buf)
        need -= len(buf)
    return out


def grow(total_mib: int) -> int:
    """Allocate ``total_mib`` MiB, 1 MiB at a time, a little work between pieces (a loop that
    does not know when to stop)."""
    held = []
    for _ in range(total_mib):
        buf = bytearray(CHUNK)
        buf[::PAGE] = _ONES
        held.append(buf)
        time.sleep(0.002)
    return len(held)


def _make_fastapi() -> Any:
    from fastapi import FastAPI
    from fastapi.responses import PlainTextResponse

    app = FastAPI()
    if GUARD != "none":
        from rtml_ebpf.asgi import MemoryLimitMiddleware

        app.add_middleware(MemoryLimitMiddleware)

    @app.get("/work", response_class=PlainTextResponse)
    def work() -> str:  # a def endpoint: FastAPI runs it in its threadpool
        chunks = build_payload()
        time.sleep(HOLD)
        return f"ok {len(chunks)}\n"

    @app.get("/healthz", response_class=PlainTextResponse)
    def healthz() -> str:
        return "ok\n"

    @app.get("/rtml-stats")
    def rtml_stats() -> Any:
        return _stats(app.middleware_stack)

    return app


def _stats(stack: Any) -> dict[str, Any]:
    """/rtml-stats: the guard's middleware found in the app's stack, then its figures."""
    while stack is not None and getattr(stack, "admission", None) is None:
        stack = getattr(stack, "app", None)
    return admission_stats(getattr(stack, "admission", None))


def _make_flask() -> Any:
    from flask import Flask, request

    app = Flask(__name__)

    @app.post("/upload")
    def upload() -> str:
        decoded = decode(request.get_data())
        time.sleep(HOLD)
        return f"ok {len(decoded)}\n"

    @app.post("/overrun")
    def overrun() -> str:
        return f"ok {grow(10 * _overrun_mib())}\n"

    @app.get("/work")
    def work() -> str:
        chunks = build_payload()
        time.sleep(HOLD)
        return f"ok {len(chunks)}\n"

    @app.get("/healthz")
    def healthz() -> str:
        return "ok\n"

    @app.get("/rtml-stats")
    def rtml_stats() -> Any:
        return _stats(app.wsgi_app)

    if GUARD != "none":
        from rtml_ebpf.wsgi import MemoryLimitMiddleware

        app.wsgi_app = MemoryLimitMiddleware(  # type: ignore[method-assign]
            app.wsgi_app, route_costs={"POST /overrun": _overrun_mib() << 20})
    return app


def _make_django() -> Any:
    from django.conf import settings

    if not settings.configured:
        settings.configure(DEBUG=False, ALLOWED_HOSTS=["*"], ROOT_URLCONF=__name__, SECRET_KEY="rtml-ebpf-demo",
                           MIDDLEWARE=[], INSTALLED_APPS=[])
    from django.core.asgi import get_asgi_application

    app = get_asgi_application()
    if GUARD == "none":
        return app
    from rtml_ebpf.asgi import MemoryLimitMiddleware

    return MemoryLimitMiddleware(app)


def _django_urls() -> list[Any]:
    from django.http import HttpResponse
    from django.urls import path

    def work(request: Any) -> Any:  # a sync view: Django runs it in asgiref's worker thread
        chunks = build_payload()
        time.sleep(HOLD)
        return HttpResponse(f"ok {len(chunks)}\n", content_type="text/plain")

    def healthz(request: Any) -> Any:
        return HttpResponse("ok\n", content_type="text/plain")

    return [path("work", work), path("healthz", healthz)]


@functools.cache
def _app(name: str) -> Any:
    if name == "django_sync":
        return _make_django()
    return _make_fastapi() if name == "fastapi_def" else _make_flask()


def __getattr__(name: str) -> Any:
    # Built on first use: a server imports only the app it serves (and its framework).
    if name in ("fastapi_def", "upload", "django_sync"):
        return _app(name)
    if name == "urlpatterns":  # Django's ROOT_URLCONF is this module
        return _django_urls()
    raise AttributeError(name)
