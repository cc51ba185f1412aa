"""A service whose POST /ignore never reads its body and allocates anyway (48 MiB, held 1.5 s),
for tests/root/test_admission_pending.py. GET /stats (excluded from admission) answers the
middleware's Admission.stats() as JSON; GET /ok answers "ok".

    uvicorn pending_app:asgi_app        gunicorn pending_app:wsgi_app
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any

from rtml_ebpf.asgi import MemoryLimitMiddleware as AsgiMiddleware
from rtml_ebpf.wsgi import MemoryLimitMiddleware as WsgiMiddleware

HOLD = 1.5
MiB = 1 << 20


def touch(n: int) -> bytearray:
    buf = bytearray(n)
    for i in range(0, n, 4096):
        buf[i] = 1
    return buf


def stats_body(middleware: Any) -> bytes:
    st = middleware.admission.stats()
    return json.dumps({"inflight": st.inflight, "rejected_learning": st.rejected_learning,
                       "rejected_budget": st.rejected_budget, "admitted": st.admitted}).encode()


async def _asgi(scope: MutableMapping[str, Any], receive: Callable[[], Awaitable[MutableMapping[str, Any]]],
                send: Callable[[MutableMapping[str, Any]], Awaitable[None]]) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            await send({"type": message["type"] + ".complete"})
            if message["type"] == "lifespan.shutdown":
                return
    if scope["type"] != "http":
        return
    if scope["path"] == "/ignore":
        held = touch(48 * MiB)  # the body is never read
        for _ in range(int(HOLD / 0.05)):
            await asyncio.sleep(0.05)
        body = f"ok {len(held)}\n".encode()
    elif scope["path"] == "/stats":
        body = stats_body(asgi_app)
    else:
        body = b"ok\n"
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def _wsgi(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    if environ["PATH_INFO"] == "/ignore":
        held = touch(48 * MiB)  # the body is never read
        for _ in range(int(HOLD / 0.05)):
            time.sleep(0.05)
        body = f"ok {len(held)}\n".encode()
    elif environ["PATH_INFO"] == "/stats":
        body = stats_body(wsgi_app)
    else:
        body = b"ok\n"
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]


asgi_app = AsgiMiddleware(_asgi, exclude_paths=["/stats"])
wsgi_app = WsgiMiddleware(_wsgi, exclude_paths=["/stats"])
