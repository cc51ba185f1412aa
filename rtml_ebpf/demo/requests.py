"""Part 4 of the demo, the services users write next (rtml_ebpf.demo.userapps), each unguarded and
then with the middleware alone:

- FastAPI ``def`` endpoints under ``uvicorn --workers 2`` (their memory lands on threadpool threads:
  the request's account follows it there);
- a Flask upload route under gunicorn pre-fork whose memory is 32x its body, 92% of bodies 64 KiB
  and 8% 1.5 MiB (the estimate scales with the body's size);
- a route declared at 8 MiB that allocates ten times that in a loop, beside requests of a learned
  24 MiB (the enforcer ends the overrun, not the worker).
"""

from __future__ import annotations

from .flood import Mix, Server, gunicorn_server, uvicorn_server

APPS = ("fastapi", "upload", "overrun")
HEAVY_TAIL: Mix = ((0.92, "POST", "/upload", 64 << 10), (0.08, "POST", "/upload", 1536 << 10))
OVERRUN: Mix = ((0.5, "GET", "/work", 0), (0.5, "POST", "/overrun", 0))
OVERRUN_CLIENTS = 6  # a few requests at a time: the surprise is the request, not the flood


def server(app: str, guard: str, env: dict[str, str]) -> Server:
    if app == "fastapi":
        return uvicorn_server(guard, workers=2, env=env, app="rtml_ebpf.demo.userapps:fastapi_def")
    return gunicorn_server(guard, env=env, app="rtml_ebpf.demo.userapps:upload")


def load(app: str, clients: int) -> tuple[int, Mix | None]:
    """(clients, request mix) of the app's flood."""
    if app == "upload":
        return clients, HEAVY_TAIL
    if app == "overrun":
        return OVERRUN_CLIENTS, OVERRUN
    return clients, None


MODULES = {"fastapi": ("fastapi", "uvicorn"), "upload": ("flask", "gunicorn"), "overrun": ("flask", "gunicorn")}
