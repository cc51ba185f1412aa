"""A FastAPI service with work that runs after its response's first or last bytes, for
tests/root/test_asgi_after_response.py (RTML_DEMO_GUARD=none leaves the middleware out):

- GET /bg?mib=N: a ``def`` endpoint that answers at once and adds a BackgroundTask allocating N MiB
  (every page touched) and holding it 0.3 s: Starlette runs it after the response's last bytes,
  inside the same app call;
- GET /stream?mib=N: a StreamingResponse that allocates 1 MiB per 64-byte piece it yields and ends
  with "end\\n" (declared at 8 MiB by route_costs, so a large N overruns it).

    uvicorn tasks_app:app
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

from fastapi import BackgroundTasks, FastAPI
from fastapi.responses import PlainTextResponse, StreamingResponse

MiB = 1 << 20
PAGE = 4096
HOLD = 0.3
STREAM_END = b"end\n"

app = FastAPI()
if os.environ.get("RTML_DEMO_GUARD", "admission") != "none":
    from rtml_ebpf.asgi import MemoryLimitMiddleware

    app.add_middleware(MemoryLimitMiddleware, route_costs={"GET /stream": 8 * MiB})


def touch(nbytes: int) -> bytearray:
    buf = bytearray(nbytes)
    buf[::PAGE] = b"\x01" * ((nbytes + PAGE - 1) // PAGE)
    return buf


@app.get("/bg", response_class=PlainTextResponse)
def background(tasks: BackgroundTasks, mib: int = 24) -> str:
    def later() -> None:
        held = [touch(MiB) for _ in range(mib)]
        time.sleep(HOLD)
        del held

    tasks.add_task(later)
    return "ok\n"


@app.get("/stream")
def stream(mib: int = 24) -> StreamingResponse:
    def pieces() -> Iterator[bytes]:
        held = []
        for _ in range(mib):
            held.append(touch(MiB))
            yield b"x" * 64
        yield STREAM_END

    return StreamingResponse(pieces(), media_type="text/plain")
