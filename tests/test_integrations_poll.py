"""The integrations on a poll limiter of this process's own cgroup: no root needed. A byte
threshold below the current usage holds the limiter tripped; one far above holds it clear."""

from __future__ import annotations

import asyncio
from concurrent import futures
from pathlib import Path
from typing import Any

import pytest

from rtml_ebpf import Limiter
from rtml_ebpf.asgi import MemoryLimitMiddleware as AsgiMiddleware
from rtml_ebpf.wsgi import MemoryLimitMiddleware as WsgiMiddleware

TRIPPED = {"backend": "poll", "threshold": 4096, "metric": "usage", "relief": False}
CLEAR = {"backend": "poll", "threshold": 1 << 50, "metric": "usage", "relief": False}


@pytest.fixture(autouse=True)
def _ledger_in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RTML_LEDGER_DIR", str(tmp_path))


def wsgi_call(app: Any, path: str = "/work") -> tuple[str, bytes]:
    got: dict[str, Any] = {}

    def start_response(status: str, headers: list[tuple[str, str]]) -> None:
        got["status"], got["headers"] = status, dict(headers)

    body = app({"PATH_INFO": path, "REQUEST_METHOD": "GET"}, start_response)
    data = b"".join(body)
    close = getattr(body, "close", None)
    if close:
        close()
    return got["status"], data


def hello(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"hello"]


@pytest.mark.parametrize("admission", [True, False])
def test_wsgi_sheds_while_tripped_and_serves_while_clear(admission: bool) -> None:
    with Limiter(**TRIPPED) as full, Limiter(**CLEAR) as free:  # type: ignore[arg-type]
        status, body = wsgi_call(WsgiMiddleware(hello, full, admission=admission))
        assert status.startswith("503") and b"memory limit" in body
        assert wsgi_call(WsgiMiddleware(hello, full, admission=admission), "/healthz")[0] == "200 OK"
        mw = WsgiMiddleware(hello, free, admission=admission)
        assert wsgi_call(mw) == ("200 OK", b"hello")
        if admission:
            assert mw.admission is not None and mw.admission.stats().admitted == 1
            assert mw.admission.stats().inflight == 0  # finished when the server closed the body


def test_asgi_sheds_while_tripped_and_meters_admitted_requests() -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        buf = bytearray(8 << 20)
        buf[::4096] = b"\x01" * (len(buf) // 4096)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    async def call(mw: Any) -> int:
        sent: list[dict[str, Any]] = []

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": b""}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        await mw({"type": "http", "path": "/work", "method": "GET"}, receive, send)
        return int(sent[0]["status"])

    with Limiter(**TRIPPED) as full, Limiter(**CLEAR) as free:  # type: ignore[arg-type]
        assert asyncio.run(call(AsgiMiddleware(app, full))) == 503
        mw = AsgiMiddleware(app, free)
        assert asyncio.run(call(mw)) == 200
        assert mw.admission is not None
        (route,) = [r for r in mw.admission.stats().routes if r.route == "GET /work"]
        assert route.samples == 1  # its cost was measured, step by step


def test_grpc_interceptor_on_a_poll_limiter() -> None:
    import grpc

    from rtml_ebpf.grpc import MemoryLimitInterceptor

    def ping(request: bytes, context: Any) -> bytes:
        return b"pong"

    for settings, want in ((TRIPPED, grpc.StatusCode.UNAVAILABLE), (CLEAR, None)):
        with Limiter(**settings) as lim:  # type: ignore[arg-type]
            server = grpc.server(futures.ThreadPoolExecutor(max_workers=2),
                                 interceptors=[MemoryLimitInterceptor(lim)])
            server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
                "t.S", {"Ping": grpc.unary_unary_rpc_method_handler(ping)}),))
            port = server.add_insecure_port("127.0.0.1:0")
            server.start()
            try:
                with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
                    call = ch.unary_unary("/t.S/Ping")
                    if want is None:
                        assert call(b"x", timeout=10) == b"pong"
                    else:
                        with pytest.raises(grpc.RpcError) as err:
                            call(b"x", timeout=10)
                        assert err.value.code() == want
            finally:
                server.stop(None)


def test_metrics_on_a_poll_limiter() -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    from rtml_ebpf.metrics import MemoryLimiterCollector

    with Limiter(**TRIPPED) as lim:  # type: ignore[arg-type]
        registry = CollectorRegistry()
        MemoryLimiterCollector(lim, registry=registry)
        text = generate_latest(registry).decode()
        assert "rtml_memory_level{" in text and 'rtml_backend_info{' in text
        usage = next(float(line.split()[-1]) for line in text.splitlines()
                     if line.startswith("rtml_memory_usage_bytes{"))
        assert usage > 0
        assert 'level="hard"' in text
        # a request the enforcer ended, as the integrations record it, is counted by integration
        from rtml_ebpf.admission.policy import ended, record_ended

        before = ended().get("wsgi", 0)
        record_ended("wsgi")
        text = generate_latest(registry).decode()
        assert f'rtml_requests_ended_total{{integration="wsgi"}} {before + 1:.1f}' in text, text
