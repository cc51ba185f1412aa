"""Each integration sheds with its status while real memory in a real cgroup trips the limiter,
and serves again once the memory is gone. Servers and clients are real, on loopback."""

from __future__ import annotations

import asyncio
import http.client
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from wsgiref.simple_server import WSGIRequestHandler, make_server

import grpc
import pytest
import uvicorn
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from support.cgroups import Cgroup, Holder, MiB, make_cgroup, needs_bpf, needs_cgroups, wait_until

import rtml_ebpf
from rtml_ebpf import Limiter, MemoryLimitReached
from rtml_ebpf.admission.policy import rejections
from rtml_ebpf.asgi import MemoryLimitMiddleware as AsgiLimit
from rtml_ebpf.grpc import AsyncMemoryLimitInterceptor, MemoryLimitInterceptor
from rtml_ebpf.metrics import MemoryLimiterCollector
from rtml_ebpf.wsgi import MemoryLimitMiddleware as WsgiLimit

pytestmark = pytest.mark.root


@pytest.fixture
def pressure() -> Iterator[tuple[Cgroup, Holder, Limiter]]:
    """A 128 MiB cgroup with a steerable process in it, watched by an eBPF limiter at 50%."""
    with make_cgroup(limit=128 * MiB) as cg:
        holder = cg.hold()
        with Limiter(cg.directory, backend="ebpf", threshold=0.5, metric="usage", relief=False) as lim:
            yield cg, holder, lim


def trip(holder: Holder, lim: Limiter) -> None:
    holder.change(80)
    assert wait_until(lim.is_mem_limit_reached), "real memory did not trip the limiter"


def clear(holder: Holder, lim: Limiter) -> None:
    holder.change(-200)
    assert wait_until(lambda: not lim.is_mem_limit_reached()), "the limiter did not clear"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_get(port: int, path: str) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("POST" if path == "/work" else "GET", path, body=b"x" * 1000 if path == "/work" else None)
    resp = conn.getresponse()
    out = resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    conn.close()
    return out


# -- ASGI ----------------------------------------------------------------------------------
BODIES_READ: list[int] = []


@contextmanager
def uvicorn_app(lim: Limiter) -> Iterator[int]:
    bodies_read = BODIES_READ

    async def work(request: Request) -> PlainTextResponse:
        bodies_read.append(len(await request.body()))
        return PlainTextResponse("ok")

    async def health(request: Request) -> PlainTextResponse:
        return PlainTextResponse("healthy")

    app = Starlette(routes=[Route("/work", work, methods=["POST"]), Route("/healthz", health)],
                    middleware=[Middleware(AsgiLimit, limiter=lim)])
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    t = threading.Thread(target=server.run, daemon=True)
    t.start()
    assert wait_until(lambda: server.started, timeout=10)
    try:
        yield port
    finally:
        server.should_exit = True
        t.join(timeout=10)


@needs_bpf
@needs_cgroups
def test_asgi_uvicorn_starlette(pressure: tuple[Cgroup, Holder, Limiter]) -> None:
    _, holder, lim = pressure
    with uvicorn_app(lim) as port:
        assert http_get(port, "/work")[0] == 200
        before = rejections().get("asgi", 0)
        trip(holder, lim)
        read_before = len(BODIES_READ)
        status, headers, body = http_get(port, "/work")
        assert status == 503 and b"memory limit" in body
        assert len(BODIES_READ) == read_before  # rejected before the app read the body
        assert 1 <= int(headers["retry-after"]) <= 5
        assert http_get(port, "/healthz")[0] == 200  # health is never shed
        assert rejections()["asgi"] == before + 1
        clear(holder, lim)
        assert http_get(port, "/work")[0] == 200


# -- WSGI ----------------------------------------------------------------------------------
class QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass


@needs_bpf
@needs_cgroups
def test_wsgi_wsgiref(pressure: tuple[Cgroup, Holder, Limiter]) -> None:
    _, holder, lim = pressure

    def app(environ: dict, start_response: object) -> list[bytes]:
        environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
        start_response("200 OK", [("Content-Type", "text/plain")])  # type: ignore[operator]
        return [b"ok"]

    server = make_server("127.0.0.1", 0, WsgiLimit(app, limiter=lim), handler_class=QuietHandler)
    port = server.server_port
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        assert http_get(port, "/work")[0] == 200
        trip(holder, lim)
        status, headers, body = http_get(port, "/work")
        assert status == 503 and "retry-after" in headers
        assert http_get(port, "/metrics")[0] == 200
        clear(holder, lim)
        assert http_get(port, "/work")[0] == 200
    finally:
        server.shutdown()
        server.server_close()


# -- gRPC ----------------------------------------------------------------------------------
def echo(request: bytes, context: object) -> bytes:
    return b"pong:" + request


HANDLERS = grpc.method_handlers_generic_handler("test.Echo", {"Ping": grpc.unary_unary_rpc_method_handler(echo)})


def call(port: int) -> tuple[grpc.StatusCode, bytes | None, dict[str, object]]:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        ping = ch.unary_unary("/test.Echo/Ping")
        try:
            return grpc.StatusCode.OK, ping(b"hi", timeout=10), {}
        except grpc.RpcError as err:
            return err.code(), None, dict(err.trailing_metadata() or ())


@needs_bpf
@needs_cgroups
@pytest.mark.parametrize("code", ["unavailable", "resource_exhausted"])
def test_grpc_sync_server(pressure: tuple[Cgroup, Holder, Limiter], code: str) -> None:
    from concurrent.futures import ThreadPoolExecutor

    _, holder, lim = pressure
    server = grpc.server(ThreadPoolExecutor(4), interceptors=[MemoryLimitInterceptor(lim, code=code)])
    server.add_generic_rpc_handlers((HANDLERS,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        assert call(port)[:2] == (grpc.StatusCode.OK, b"pong:hi")
        trip(holder, lim)
        status, _, trailers = call(port)
        if code == "unavailable":
            assert status == grpc.StatusCode.UNAVAILABLE
        else:
            assert status == grpc.StatusCode.RESOURCE_EXHAUSTED
            from google.rpc import error_details_pb2, status_pb2

            detail = status_pb2.Status.FromString(trailers["grpc-status-details-bin"]).details[0]
            info = error_details_pb2.RetryInfo()
            assert detail.Unpack(info) and 1 <= info.retry_delay.seconds <= 5
        clear(holder, lim)
        assert call(port)[0] == grpc.StatusCode.OK
    finally:
        server.stop(None)


@needs_bpf
@needs_cgroups
def test_grpc_aio_server(pressure: tuple[Cgroup, Holder, Limiter]) -> None:
    _, holder, lim = pressure

    async def echo_async(request: bytes, context: object) -> bytes:
        return b"pong:" + request

    async def scenario() -> None:
        server = grpc.aio.server(interceptors=[AsyncMemoryLimitInterceptor(lim)])
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
            "test.Echo", {"Ping": grpc.unary_unary_rpc_method_handler(echo_async)}),))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                ping = ch.unary_unary("/test.Echo/Ping")
                assert await ping(b"hi", timeout=10) == b"pong:hi"
                await asyncio.to_thread(trip, holder, lim)
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await ping(b"hi", timeout=10)
                assert err.value.code() == grpc.StatusCode.UNAVAILABLE
                await asyncio.to_thread(clear, holder, lim)
                assert await ping(b"hi", timeout=10) == b"pong:hi"
        finally:
            await server.stop(None)

    asyncio.run(scenario())


# -- decorator, asyncio helper ---------------------------------------------------------------
@needs_bpf
@needs_cgroups
def test_guard_and_wait_for_headroom(pressure: tuple[Cgroup, Holder, Limiter]) -> None:
    _, holder, lim = pressure

    @rtml_ebpf.guard(limiter=lim)
    def handle(x: int) -> int:
        return x * 2

    @rtml_ebpf.guard(limiter=lim)
    async def handle_async(x: int) -> int:
        return x * 3

    assert handle(2) == 4 and asyncio.run(handle_async(2)) == 6
    trip(holder, lim)
    with pytest.raises(MemoryLimitReached, match="handle: memory limit reached"):
        handle(2)
    with pytest.raises(MemoryLimitReached):
        asyncio.run(handle_async(2))
    assert asyncio.run(rtml_ebpf.wait_for_headroom(0.2, limiter=lim)) is False  # still full

    async def free_later() -> bool:
        waiter = asyncio.create_task(rtml_ebpf.wait_for_headroom(10, limiter=lim))
        await asyncio.sleep(0.1)
        assert not waiter.done()
        await asyncio.to_thread(holder.change, -200)
        return await waiter

    t0 = time.monotonic()
    assert asyncio.run(free_later()) is True
    assert time.monotonic() - t0 < 5
    assert handle(2) == 4


# -- metrics ---------------------------------------------------------------------------------
@needs_bpf
@needs_cgroups
def test_metrics_scraped_over_http(pressure: tuple[Cgroup, Holder, Limiter]) -> None:
    cg, holder, lim = pressure
    trip(holder, lim)
    time.sleep(0.2)
    registry = CollectorRegistry()
    MemoryLimiterCollector(lim, registry=registry)
    port = free_port()
    server, thread = start_http_server(port, addr="127.0.0.1", registry=registry)
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
        conn.close()
    finally:
        server.shutdown()
        thread.join(timeout=5)
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for fam in text_string_to_metric_families(text) for s in fam.samples}
    c = (("cgroup", cg.directory),)
    kernel_usage = cg.usage()
    assert samples[("rtml_memory_limit_bytes", c)] == 128 * MiB
    assert samples[("rtml_memory_threshold_bytes", (("cgroup", cg.directory), ("level", "hard")))] == 64 * MiB
    assert abs(samples[("rtml_memory_usage_bytes", c)] - kernel_usage) <= 64 * 4096 * 8
    assert samples[("rtml_memory_usage_bytes", c)] > 80 * MiB
    assert samples[("rtml_memory_level", c)] == 2
    assert samples[("rtml_memory_trips_total", (("cgroup", cg.directory), ("level", "hard")))] >= 1
    assert samples[("rtml_oom_kills_total", c)] == 0
    assert samples[("rtml_relief_runs_total", c)] == 0
    info = [k for k in samples if k[0] == "rtml_backend_info"][0]
    assert ("backend", "ebpf") in info[1]
    assert any(k[0] == "rtml_rejections_total" for k in samples) or not rejections()
