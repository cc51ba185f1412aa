"""ORCA load reports and the drain-rate Retry-After on a real cgroup with a real limit: the
figures follow real memory, and a rejection while the memory drains says when it will be back
under the threshold at the measured rate."""

from __future__ import annotations

import http.client
import threading
import time
from collections.abc import Iterator
from wsgiref.simple_server import WSGIRequestHandler, make_server

import pytest
from support.cgroups import Cgroup, Holder, MiB, make_cgroup, needs_bpf, needs_cgroups, wait_until
from support.orca_parse import parse_header

from rtml_ebpf import Limiter
from rtml_ebpf.orca import RETRY_AFTER_MAX_S
from rtml_ebpf.wsgi import MemoryLimitMiddleware

pytestmark = pytest.mark.root
DEFAULT_RETRY = 30  # retry_after=(30, 30): a derived value is told apart from the default


class QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass


@pytest.fixture
def served() -> Iterator[tuple[Cgroup, Holder, Limiter, int]]:
    """A 128 MiB cgroup holding 32 MiB, an eBPF limiter at 50%, a WSGI server reporting it."""
    with make_cgroup(limit=128 * MiB) as cg:
        holder = cg.hold()
        holder.change(32)
        with Limiter(cg.directory, backend="ebpf", threshold=0.5, metric="usage", relief=False) as lim:
            def app(environ: dict, start_response: object) -> list[bytes]:
                start_response("200 OK", [("Content-Type", "text/plain")])  # type: ignore[operator]
                return [b"ok"]

            mw = MemoryLimitMiddleware(app, lim, load_report="text", retry_after=(DEFAULT_RETRY, DEFAULT_RETRY))
            server = make_server("127.0.0.1", 0, mw, handler_class=QuietHandler)
            t = threading.Thread(target=server.serve_forever, daemon=True)
            t.start()
            try:
                yield cg, holder, lim, server.server_port
            finally:
                server.shutdown()
                server.server_close()


def get(port: int) -> tuple[int, dict[str, str]]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", "/work")
    resp = conn.getresponse()
    resp.read()
    conn.close()
    return resp.status, {k.lower(): v for k, v in resp.getheaders()}


@needs_bpf
@needs_cgroups
def test_the_report_follows_real_memory(served: tuple[Cgroup, Holder, Limiter, int]) -> None:
    _, holder, lim, port = served
    status, headers = get(port)
    st = lim.stats()
    report = parse_header(headers["endpoint-load-metrics"])
    assert status == 200
    assert st.limit_bytes == 128 * MiB and st.threshold_bytes == 64 * MiB
    assert report["mem_utilization"] == pytest.approx(st.usage_bytes / st.limit_bytes, abs=0.05)
    assert report["application_utilization"] == pytest.approx(st.usage_bytes / st.threshold_bytes, abs=0.1)
    assert 0.25 <= report["application_utilization"] < 1.0  # type: ignore[operator]  # 32 MiB held of 64
    holder.change(48)
    assert wait_until(lim.is_mem_limit_reached)
    time.sleep(0.15)  # past the reading's refresh interval
    status, headers = get(port)
    report = parse_header(headers["endpoint-load-metrics"])
    assert status == 503 and report["application_utilization"] >= 1.0  # type: ignore[operator]
    assert 0.6 <= report["mem_utilization"] <= 1.0  # type: ignore[operator]


@needs_bpf
@needs_cgroups
def test_retry_after_follows_the_drain_rate(served: tuple[Cgroup, Holder, Limiter, int]) -> None:
    _, holder, lim, port = served
    holder.change(60)  # ~92 MiB: 28 over the threshold
    assert wait_until(lim.is_mem_limit_reached)
    time.sleep(1.5)  # flat: no drain to measure
    status, headers = get(port)
    assert status == 503 and int(headers["retry-after"]) == DEFAULT_RETRY

    # Drain at ~1 MiB per 50 ms (about 20 MiB/s) while rejected clients ask when to come back.
    seen: list[int] = []
    stop = threading.Event()

    def ask() -> None:
        while not stop.is_set():
            status, headers = get(port)
            if status == 503:
                seen.append(int(headers["retry-after"]))
            time.sleep(0.05)

    asker = threading.Thread(target=ask)
    asker.start()
    try:
        for _ in range(40):
            holder.change(-1)
            time.sleep(0.05)
    finally:
        stop.set()
        asker.join(timeout=10)
    derived = [s for s in seen if s != DEFAULT_RETRY]
    assert len(derived) >= 4, f"no Retry-After from the drain rate among {seen}"
    # The rate is a slope over the last second of readings: as the drain starts it still holds
    # the flat second before, and the first answers are longer. Once it holds only the drain,
    # ~20 MiB/s with at most 28 MiB over: back under within a couple of seconds (+20% jitter).
    settled = derived[len(derived) // 2:]
    assert all(1 <= s <= 4 for s in settled), seen
    assert all(1 <= s <= RETRY_AFTER_MAX_S for s in derived), seen
    assert max(seen) <= max(DEFAULT_RETRY, RETRY_AFTER_MAX_S)
