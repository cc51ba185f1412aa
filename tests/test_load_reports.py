"""ORCA load reports (rtml_ebpf.orca) through real servers, read by a strict parser of the
format (tests/support/orca_parse.py). A poll limiter of this process's own cgroup: no root.
A byte threshold far above usage holds the limiter clear; one below it holds it tripped."""

from __future__ import annotations

import asyncio
import base64
import http.client
import json
import threading
from collections.abc import Iterator
from concurrent import futures
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

import grpc
import pytest
import uvicorn
from support.cgroups import wait_until
from support.orca_parse import OrcaError, parse_binary, parse_header, parse_text

from rtml_ebpf import ConfigError, Limiter
from rtml_ebpf.asgi import MemoryLimitMiddleware as AsgiLimit
from rtml_ebpf.grpc import AsyncMemoryLimitInterceptor, MemoryLimitInterceptor
from rtml_ebpf.limiter import Stats
from rtml_ebpf.orca import HEADER_BIN, Load, binary_form, json_form, load_from_stats, text_form
from rtml_ebpf.wsgi import MemoryLimitMiddleware as WsgiLimit

GiB = 1 << 30
CLEAR = {"backend": "poll", "threshold": 64 * GiB, "metric": "usage", "relief": False}
TRIPPED = {"backend": "poll", "threshold": 4096, "metric": "usage", "relief": False}


@pytest.fixture(autouse=True)
def _ledger_in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RTML_LEDGER_DIR", str(tmp_path))


def expect_matches(report: dict[str, object], lim: Limiter) -> None:
    """The report against a reading of the same cgroup (usage moves a little in between)."""
    st = lim.stats()
    app = report["application_utilization"]
    assert isinstance(app, float) and app == pytest.approx(st.usage_bytes / st.threshold_bytes, rel=0.2)  # type: ignore[operator]
    if st.limit_bytes is None:
        assert "mem_utilization" not in report  # no limit: no utilization of it
    else:
        assert report["mem_utilization"] == pytest.approx(st.usage_bytes / st.limit_bytes, rel=0.2)


# -- the forms, and the parser's strictness ------------------------------------------------
def test_the_three_forms_read_back_the_same_under_the_strict_parser() -> None:
    load = Load(mem_utilization=0.5, application_utilization=1.25, rps_fractional=12.5, drain_s=None)
    want = {"mem_utilization": 0.5, "application_utilization": 1.25, "rps_fractional": 12.5}
    assert text_form(load) == "TEXT mem_utilization=0.5, application_utilization=1.25, rps_fractional=12.5"
    assert parse_header(text_form(load)) == want
    assert parse_header(json_form(load)) == want
    assert parse_binary(binary_form(load)) == want
    # Fields not known are left out, not sent as zero.
    assert parse_header(text_form(Load(None, 0.25, None, None))) == {"application_utilization": 0.25}


@pytest.mark.parametrize("bad", [
    "mem_utilization=0.5",  # no form prefix
    "TEXT mem_utilization=1.5",  # above the message's cap
    "TEXT mem_utilization=0.5, mem_utilization=0.6",  # twice
    "TEXT cpu_load=0.5",  # not a field
    "TEXT application_utilization=nan",
    "TEXT application_utilization=-1",
    "TEXT application_utilization=\"0.5\"",
    "TEXT named_metrics.=3",
    "TEXT mem_utilization=0.5,",
    "JSON {\"mem_utilization\": \"0.5\"}",
    "JSON {\"memory\": 0.5}",
])
def test_the_strict_parser_refuses_what_the_format_does_not_allow(bad: str) -> None:
    with pytest.raises(OrcaError):
        parse_header(bad)


def test_binary_form_is_the_orca_message() -> None:
    # Field 2 (mem_utilization) as a double: tag 0x11, then 0.5 little-endian; field 9: tag 0x49.
    assert binary_form(Load(0.5, None, None, None)) == bytes.fromhex("11000000000000e03f")
    assert binary_form(Load(None, 1.0, None, None)) == bytes.fromhex("49000000000000f03f")


def test_load_from_stats_defines_the_figures() -> None:
    base = {f: None for f in Stats.__dataclass_fields__}
    st = Stats(**{**base, "usage_bytes": 300, "working_set_bytes": 200, "limit_bytes": 1000,  # type: ignore[arg-type]
                  "threshold_bytes": 400, "headroom_bytes": 100, "metric": "usage",
                  "growth_bytes_per_s": 1e6})
    load = load_from_stats(st, 5.0)
    assert (load.mem_utilization, load.application_utilization, load.rps_fractional) == (0.3, 0.75, 5.0)
    assert load.drain_s is None  # under the threshold: nothing to drain
    over = {**st.__dict__, "usage_bytes": 10 << 20, "limit_bytes": 16 << 20, "threshold_bytes": 8 << 20,
            "headroom_bytes": -(2 << 20), "growth_bytes_per_s": -(1 << 20)}
    draining = load_from_stats(Stats(**over), None)
    assert draining.application_utilization == 1.25 and draining.drain_s == pytest.approx(2.0)
    # Growing, or falling slower than the page counter's noise: no drain, the default Retry-After.
    assert load_from_stats(Stats(**{**over, "growth_bytes_per_s": 1e6}), None).drain_s is None
    assert load_from_stats(Stats(**{**over, "growth_bytes_per_s": -1e4}), None).drain_s is None


@pytest.mark.parametrize("value", ["binary", "TEXT", 1, "bin"])
def test_a_bad_load_report_is_a_config_error_at_init(value: object) -> None:
    with Limiter(**CLEAR) as lim:  # type: ignore[arg-type]
        with pytest.raises(ConfigError, match="load_report="):
            WsgiLimit(lambda e, s: [], lim, load_report=value)  # type: ignore[arg-type]
        with pytest.raises(ConfigError, match="load_report="):
            AsgiLimit(lambda s, r, se: None, lim, load_report=value)  # type: ignore[arg-type]
    if value != "bin":  # bin is a gRPC form (binary metadata), not an HTTP header one
        with pytest.raises(ConfigError, match="load_report="):
            MemoryLimitInterceptor(None, load_report=value)  # type: ignore[arg-type]


# -- real servers ----------------------------------------------------------------------------
def http_get(port: int, path: str = "/work") -> tuple[int, dict[str, str]]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", path)
    resp = conn.getresponse()
    resp.read()
    conn.close()
    return resp.status, {k.lower(): v for k, v in resp.getheaders()}


class QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass


@contextmanager
def wsgi_server(lim: Limiter, **kw: Any) -> Iterator[int]:
    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ok"]

    server = make_server("127.0.0.1", 0, WsgiLimit(app, lim, **kw), handler_class=QuietHandler)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        yield server.server_port
    finally:
        server.shutdown()
        server.server_close()


@contextmanager
def asgi_server(lim: Limiter, **kw: Any) -> Iterator[int]:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": b"ok"})

    server = uvicorn.Server(uvicorn.Config(AsgiLimit(app, lim, **kw), host="127.0.0.1", port=0,
                                           log_level="warning"))
    t = threading.Thread(target=server.run, daemon=True)
    t.start()
    assert wait_until(lambda: server.started, timeout=10)
    try:
        yield server.servers[0].sockets[0].getsockname()[1]
    finally:
        server.should_exit = True
        t.join(timeout=10)


@pytest.mark.parametrize("serve", [wsgi_server, asgi_server], ids=["wsgi", "asgi"])
@pytest.mark.parametrize("form", ["text", "json"])
def test_http_responses_carry_the_report(serve: Any, form: str) -> None:
    with Limiter(**CLEAR) as lim, serve(lim, load_report=form) as port:  # type: ignore[arg-type]
        status, headers = http_get(port)
        assert status == 200
        assert headers["endpoint-load-metrics"].startswith(form.upper() + " ")
        report = parse_header(headers["endpoint-load-metrics"])
        expect_matches(report, lim)
        assert report["application_utilization"] < 1.0  # type: ignore[operator]  # clear: below where it sheds
        # After a window of requests the request rate is reported too (the balancer's qps).
        for _ in range(5):
            http_get(port)
        assert wait_until(lambda: "rps_fractional" in parse_header(http_get(port)[1]["endpoint-load-metrics"]),
                          timeout=5, interval=0.2)


@pytest.mark.parametrize("serve", [wsgi_server, asgi_server], ids=["wsgi", "asgi"])
def test_a_rejection_carries_the_report_and_no_report_when_off(serve: Any) -> None:
    with Limiter(**TRIPPED) as lim:  # type: ignore[arg-type]
        with serve(lim, load_report=True) as port:
            status, headers = http_get(port)
            assert status == 503 and 1 <= int(headers["retry-after"]) <= 5  # flat: the jittered default
            report = parse_text(headers["endpoint-load-metrics"].removeprefix("TEXT "))
            assert report["application_utilization"] > 1.0  # type: ignore[operator]  # over: shedding
        with serve(lim) as port:
            assert "endpoint-load-metrics" not in http_get(port)[1]


def ping(request: bytes, context: Any) -> bytes:
    context.set_trailing_metadata((("x-app", "kept"),))
    return b"pong"


def grpc_trailers_on_the_wire(port: int, method: str) -> dict[str, str]:
    """One unary call over a plain HTTP/2 connection: the trailers as sent. gRPC's own client
    takes endpoint-load-metrics-bin out of the metadata for its balancer, so it cannot show it."""
    import socket

    import h2.connection
    import h2.events

    conn = h2.connection.H2Connection()
    conn.initiate_connection()
    trailers: dict[str, str] = {}
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(conn.data_to_send())
        sid = conn.get_next_available_stream_id()
        conn.send_headers(sid, [(":method", "POST"), (":scheme", "http"), (":path", method),
                                (":authority", f"127.0.0.1:{port}"), ("content-type", "application/grpc"),
                                ("te", "trailers")])
        conn.send_data(sid, b"\x00\x00\x00\x00\x01x", end_stream=True)  # one uncompressed message: b"x"
        sock.sendall(conn.data_to_send())
        while True:
            data = sock.recv(65536)
            assert data, "the server closed the connection before the trailers"
            for ev in conn.receive_data(data):
                if isinstance(ev, h2.events.DataReceived):
                    conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                # A call that ends without a message is "trailers-only": one HEADERS frame.
                if isinstance(ev, (h2.events.ResponseReceived, h2.events.TrailersReceived)):
                    trailers.update({k.decode(): v.decode() for k, v in ev.headers})
                if isinstance(ev, h2.events.StreamEnded):
                    return trailers
            sock.sendall(conn.data_to_send())


@pytest.mark.parametrize("form", ["bin", "text"])
def test_grpc_calls_end_with_the_report_in_trailing_metadata(form: str) -> None:
    with Limiter(**CLEAR) as lim:  # type: ignore[arg-type]
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=2),
                             interceptors=[MemoryLimitInterceptor(lim, load_report=form)])
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
            "t.S", {"Ping": grpc.unary_unary_rpc_method_handler(ping)}),))
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        try:
            with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
                reply, call = ch.unary_unary("/t.S/Ping").with_call(b"x", timeout=10)
            assert reply == b"pong" and dict(call.trailing_metadata())["x-app"] == "kept"  # the handler's stay
            trailers = grpc_trailers_on_the_wire(port, "/t.S/Ping")
            assert trailers["grpc-status"] == "0" and trailers["x-app"] == "kept"
            if form == "bin":  # binary metadata travels as unpadded base64
                raw = trailers[HEADER_BIN]
                report = parse_binary(base64.b64decode(raw + "=" * (-len(raw) % 4), validate=True))
            else:
                report = parse_header(trailers["endpoint-load-metrics"])
            expect_matches(report, lim)
        finally:
            server.stop(None)


def test_grpc_aio_calls_and_rejections_carry_the_report() -> None:
    async def aping(request: bytes, context: Any) -> bytes:
        return b"pong"

    async def scenario(lim: Limiter) -> dict[str, str]:
        server = grpc.aio.server(interceptors=[AsyncMemoryLimitInterceptor(lim, load_report=True)])
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
            "t.S", {"Ping": grpc.unary_unary_rpc_method_handler(aping)}),))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            return await asyncio.to_thread(grpc_trailers_on_the_wire, port, "/t.S/Ping")
        finally:
            await server.stop(None)

    def report(trailers: dict[str, str]) -> dict[str, object]:
        raw = trailers[HEADER_BIN]
        return parse_binary(base64.b64decode(raw + "=" * (-len(raw) % 4), validate=True))

    with Limiter(**CLEAR) as lim:  # type: ignore[arg-type]
        trailers = asyncio.run(scenario(lim))
        assert trailers["grpc-status"] == "0"
        expect_matches(report(trailers), lim)
    with Limiter(**TRIPPED) as lim:  # type: ignore[arg-type]
        trailers = asyncio.run(scenario(lim))
        assert trailers["grpc-status"] == str(grpc.StatusCode.UNAVAILABLE.value[0])
        assert 1 <= int(trailers["retry-after"]) <= 5
        assert report(trailers)["application_utilization"] > 1.0  # type: ignore[operator]


def test_json_form_is_compact_json() -> None:
    body = json_form(Load(0.25, 0.5, None, None)).removeprefix("JSON ")
    assert json.loads(body) == {"mem_utilization": 0.25, "application_utilization": 0.5}
