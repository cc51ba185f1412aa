"""A guarded flood measured for goodput (P6, P12): the service is warmed (each worker loads its
programs and learns its routes, one request at a time), its idle usage read, then, while the
flood runs, the number of requests in flight in the whole cgroup is sampled from the admission
ledger every 20 ms; at the end the workers' learned estimates are read from /rtml-stats."""

from __future__ import annotations

import http.client
import json
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from rtml_ebpf.admission.ledger import read_totals
from rtml_ebpf.demo.flood import Flood, RunResult

Request = tuple[str, str, int]  # method, path, body bytes


@dataclass
class Measured:
    result: RunResult
    idle_bytes: int | None = None
    inflight: list[int] = field(default_factory=list)
    routes: list[dict[str, Any]] = field(default_factory=list)  # /rtml-stats "routes", every read


def _ask(port: int, method: str, path: str, size: int = 0) -> bytes:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request(method, path, body=b"x" * size if size else None)
    body = conn.getresponse().read()
    conn.close()
    return body


def measured_flood(flood: Flood, warm: list[Request], stats_reads: int = 8) -> Measured:
    m = Measured(RunResult(flood.r.name, flood.r.guard))
    start = flood.start_service
    ready = threading.Event()
    where: list[str] = []

    def warm_start(cg: Any) -> None:
        start(cg)
        if ready.is_set():
            return
        for method, path, size in warm:
            _ask(flood.port, method, path, size)
        time.sleep(1.0)
        m.idle_bytes = cg.usage()
        where.append(cg.directory)
        ready.set()

    def sample() -> None:
        while not flood.stop.is_set() and not ready.is_set():
            time.sleep(0.05)
        while not flood.stop.is_set():
            # the service runs as root with this environment: its ledger is where ours would be
            totals = read_totals(os.stat(where[0]).st_ino)
            if totals is not None:
                m.inflight.append(totals.inflight)
            time.sleep(0.02)
        for _ in range(stats_reads):  # one worker answers each read: several reads see several
            try:
                m.routes.extend(json.loads(_ask(flood.port, "GET", "/rtml-stats")).get("routes", []))
            except (OSError, ValueError, http.client.HTTPException):
                pass

    flood.start_service = warm_start  # type: ignore[method-assign]
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    m.result = flood.run()
    sampler.join(timeout=15)
    return m
