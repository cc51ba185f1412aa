"""A FastAPI service with one ``async def`` route whose cost is a surprise (adversarial review D10):
``GET /async?mib=N`` builds N MiB in 1 MiB pieces on the event loop, with no await between them,
then holds it across ``await asyncio.sleep``. Most requests ask 8 MiB, a few 80 MiB: one route,
so its estimate is the small ones'. ``RTML_DEMO_GUARD=none`` leaves the middleware out (the
control); anything else adds it as the README shows."""

from __future__ import annotations

import asyncio
import os

from fastapi import FastAPI
from fastapi.responses import PlainTextResponse

from rtml_ebpf.demo.userapps import CHUNK, PAGE

HOLD = 0.3

app = FastAPI()
if os.environ.get("RTML_DEMO_GUARD", "admission") != "none":
    from rtml_ebpf.asgi import MemoryLimitMiddleware

    app.add_middleware(MemoryLimitMiddleware)


def build(mib: int) -> list[bytearray]:
    held = []
    for _ in range(mib):
        buf = bytearray(CHUNK)
        buf[::PAGE] = b"\x01" * (CHUNK // PAGE)  # touched, as a decoder writes what it builds
        held.append(buf)
    return held


@app.get("/async", response_class=PlainTextResponse)
async def surprise(mib: int = 8) -> str:
    held = build(mib)
    await asyncio.sleep(HOLD)
    return f"ok {len(held)}\n"


@app.get("/healthz", response_class=PlainTextResponse)
async def healthz() -> str:
    return "ok\n"
