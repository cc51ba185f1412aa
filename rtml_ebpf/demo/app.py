"""The demo's application as users deploy it: a memory-heavy handler with no check inside,
guarded by the middleware alone (or not at all), for gunicorn or uvicorn.

    gunicorn --preload -w 4 -k gthread --threads 8 rtml_ebpf.demo.app:wsgi
    uvicorn --workers 2 rtml_ebpf.demo.app:asgi

Each request builds a payload of RTML_DEMO_PAYLOAD_MIB (24) MiB in 1 MiB chunks, touching
every page as a decoder writing its output would, and holds it RTML_DEMO_HOLD (0.3) seconds.
RTML_DEMO_GUARD picks the guard: ``none``, ``door`` (the check at the door only),
``admission`` (default: budget admission), ``poll-door`` / ``poll-admission`` (the same on
a 10 ms poll of the cgroup files instead of the kernel-fed backend). The threshold and
metric come from RTML_THRESHOLD / RTML_METRIC as for any deployment.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any

from rtml_ebpf.config import PAGE_SIZE

CHUNK = 1 << 20
PAGE = PAGE_SIZE
GUARDS = ("none", "door", "admission", "poll-door", "poll-admission")


def _settings() -> tuple[int, float, str]:
    payload = int(os.environ.get("RTML_DEMO_PAYLOAD_MIB", "24")) * CHUNK
    hold = float(os.environ.get("RTML_DEMO_HOLD", "0.3"))
    guard = os.environ.get("RTML_DEMO_GUARD", "admission")
    if guard not in GUARDS:
        raise SystemExit(f"RTML_DEMO_GUARD={guard!r}: use one of {', '.join(GUARDS)}")
    return payload, hold, guard


PAYLOAD, HOLD, GUARD = _settings()
_ONES = b"\x01" * (CHUNK // PAGE)


def build_payload() -> list[bytearray]:
    chunks = []
    for _ in range(PAYLOAD // CHUNK):
        buf = bytearray(CHUNK)
        buf[::PAGE] = _ONES  # fault every page in
        chunks.append(buf)
    return chunks


def _limiter() -> Any:
    if not GUARD.startswith("poll"):
        return None  # the process default: what a user gets from the README
    from rtml_ebpf import Limiter
    from rtml_ebpf.config import env_settings

    s = env_settings().as_kwargs()
    return Limiter(backend="poll", poll_interval=0.01, relief=False,
                   **{k: v for k, v in s.items() if k in ("threshold", "metric")})  # type: ignore[arg-type]


def admission_stats(adm: Any) -> dict[str, Any]:
    """/rtml-stats: this worker's admission and limiter figures (``adm``: an Admission or None),
    for the demo, its benchmarks and its tests."""
    out: dict[str, Any] = {"pid": os.getpid()}
    if adm is not None:
        st = adm.stats()
        out["admission"] = {k: v for k, v in st.__dict__.items() if k != "routes"}
        out["routes"] = [r.__dict__ for r in st.routes]
        lim = adm.limiter()
        if lim is not None:
            out["backend"], out["room"] = lim.backend, lim.room()
    return out


def stats_json() -> bytes:
    import json

    return json.dumps(admission_stats(getattr(wsgi, "admission", None) or getattr(asgi, "admission", None))).encode()


def _wsgi_work(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    if environ.get("PATH_INFO") == "/healthz":
        start_response("200 OK", [("Content-Length", "3")])
        return [b"ok\n"]
    if environ.get("PATH_INFO") == "/rtml-stats":
        body = stats_json()
        start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
        return [body]
    chunks = build_payload()
    time.sleep(HOLD)
    body = b"ok %d\n" % len(chunks)
    del chunks
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]


async def _asgi_work(scope: MutableMapping[str, Any], receive: Callable[[], Awaitable[MutableMapping[str, Any]]],
                     send: Callable[[MutableMapping[str, Any]], Awaitable[None]]) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope.get("path") == "/healthz":
        body = b"ok\n"
    elif scope.get("path") == "/rtml-stats":
        body = stats_json()
    else:
        chunks = build_payload()
        await asyncio.sleep(HOLD)
        body = b"ok %d\n" % len(chunks)
        del chunks
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def _wrap_wsgi() -> Any:
    if GUARD == "none":
        return _wsgi_work
    from rtml_ebpf.wsgi import MemoryLimitMiddleware

    return MemoryLimitMiddleware(_wsgi_work, _limiter(), admission=GUARD.endswith("admission"),
                                 exclude_paths=("/healthz", "/rtml-stats"))


def _wrap_asgi() -> Any:
    if GUARD == "none":
        return _asgi_work
    from rtml_ebpf.asgi import MemoryLimitMiddleware

    return MemoryLimitMiddleware(_asgi_work, _limiter(), admission=GUARD.endswith("admission"),
                                 exclude_paths=("/healthz", "/rtml-stats"))


wsgi = _wrap_wsgi()
asgi = _wrap_asgi()
