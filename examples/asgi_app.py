"""A Starlette app that sheds load with 503 when its memory cgroup nears its limit.

Run: python examples/asgi_app.py   (serves one request to itself, prints it, exits)
Real use: uvicorn examples.asgi_app:app
"""

import threading
import time
import urllib.request

import uvicorn
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from rtml_ebpf.asgi import MemoryLimitMiddleware


async def work(request):
    payload = await request.body()  # never reached while shedding: the middleware answers first
    return PlainTextResponse(f"processed {len(payload)} bytes\n")


async def healthz(request):
    return PlainTextResponse("ok\n")  # excluded by default: never shed


app = Starlette(
    routes=[Route("/work", work, methods=["GET", "POST"]), Route("/healthz", healthz)],
    middleware=[Middleware(MemoryLimitMiddleware)],  # limiter=None: the process default (RTML_* env)
)

if __name__ == "__main__":
    import socket

    with socket.socket() as sock:  # a free port on loopback
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.01)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/work") as resp:
        print(resp.status, resp.read().decode().strip())
    server.should_exit = True
