"""A FastAPI app whose endpoints allocate known amounts: a ``def`` endpoint (run in anyio's
threadpool) and an ``async`` one that awaits ``asyncio.to_thread``, with the ASGI middleware."""

from __future__ import annotations

import asyncio
from typing import Any


def fastapi_app() -> Any:
    from fastapi import FastAPI
    from fastapi.responses import PlainTextResponse

    from rtml_ebpf.asgi import MemoryLimitMiddleware
    from rtml_ebpf.demo.userapps import CHUNK, PAGE

    def build(n_mib: int) -> int:
        held = []
        for _ in range(n_mib):
            buf = bytearray(CHUNK)
            buf[::PAGE] = b"\x01" * (CHUNK // PAGE)
            held.append(buf)
        return len(held)

    app = FastAPI()
    app.add_middleware(MemoryLimitMiddleware)

    @app.get("/def", response_class=PlainTextResponse)
    def sync_endpoint() -> str:
        return str(build(24))

    @app.get("/async", response_class=PlainTextResponse)
    async def async_endpoint() -> str:
        return str(await asyncio.to_thread(build, 16))

    return app
