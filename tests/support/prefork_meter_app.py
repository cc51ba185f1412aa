"""A WSGI service for tests/root/test_agent_meter.py, run by ``gunicorn --preload`` as uid 65534:
the Limiter (through the node agent) and the middleware are built at import, in the master, so
every worker is a forked process measuring with the meter it inherited.

GET /alloc touches 16 MiB inside the request; GET /stats (excluded from admission) answers this
worker's pid, its admission's meter source and the thread meter's stats, and the route estimates.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from typing import Any

from rtml_ebpf import Limiter
from rtml_ebpf.wsgi import MemoryLimitMiddleware

MiB = 1 << 20
LIM = Limiter(backend="agent", threshold=0.9, metric="usage", relief=False)
MASTER = os.getpid()


def _app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    if environ["PATH_INFO"] == "/alloc":
        buf = bytearray(16 * MiB)
        for i in range(0, len(buf), 4096):
            buf[i] = 1
        del buf
        body = b"ok\n"
    else:
        adm = application.admission
        assert adm is not None
        st = adm.stats()
        meter = LIM.thread_meter()
        body = json.dumps({"pid": os.getpid(), "master": MASTER, "meter": st.meter, "admitted": st.admitted,
                           "meter_stats": meter.stats() if hasattr(meter, "stats") else None,
                           "routes": {r.route: r.estimate for r in st.routes}}).encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]


application = MemoryLimitMiddleware(_app, LIM, exclude_paths=("/stats",))
