"""An upload service for tests/root/test_admission_bodies.py: the middleware as users add it,
with a declared cost of 32 bytes of memory per body byte for POST /upload (the app itself only
counts what it was given, so a request the middleware lets through whole answers 200).

    uvicorn body_app:asgi_app        gunicorn body_app:wsgi_app

POST /upload answers how many body bytes the app read; POST /learn is an undeclared route (its
first requests are learning); GET /ok answers "ok" (undeclared: learning too on a fresh service).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any

from rtml_ebpf.asgi import MemoryLimitMiddleware as AsgiMiddleware
from rtml_ebpf.wsgi import MemoryLimitMiddleware as WsgiMiddleware

COSTS = {"POST /upload": 32.0}
PROGRESS = {"seen": 0}  # body bytes the app was given by the last POST, as it read them (GET /seen)


async def _asgi(scope: MutableMapping[str, Any], receive: Callable[[], Awaitable[MutableMapping[str, Any]]],
                send: Callable[[MutableMapping[str, Any]], Awaitable[None]]) -> None:
    if scope["type"] == "lifespan":  # as Starlette and FastAPI answer it
        while True:
            message = await receive()
            await send({"type": message["type"] + ".complete"})
            if message["type"] == "lifespan.shutdown":
                return
    if scope["type"] != "http":
        return
    seen = 0
    if scope["method"] == "POST":
        while True:
            message = await receive()
            seen += len(message.get("body", b""))
            PROGRESS["seen"] = seen
            if not message.get("more_body", False):
                break
    elif scope["path"] == "/seen":
        seen = PROGRESS["seen"]
    body = f"ok {seen}\n".encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def _wsgi(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    seen = 0
    if environ["REQUEST_METHOD"] == "POST":
        stream = environ["wsgi.input"]
        length = environ.get("CONTENT_LENGTH")
        if length:
            left = int(length)
            while left > 0:
                data = stream.read(min(left, 65536))
                if not data:
                    break
                seen += len(data)
                PROGRESS["seen"] = seen
                left -= len(data)
        else:
            while data := stream.read(65536):
                seen += len(data)
                PROGRESS["seen"] = seen
    elif environ["PATH_INFO"] == "/seen":
        seen = PROGRESS["seen"]
    body = f"ok {seen}\n".encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]


asgi_app = AsgiMiddleware(_asgi, cost_per_byte=COSTS)
wsgi_app = WsgiMiddleware(_wsgi, cost_per_byte=COSTS)
