"""A gRPC server whose methods allocate like the demo's HTTP handler.

    python tests/support/grpc_server.py PORT GUARD [KIND [THREADS]]

GUARD: ``none``, ``admission`` (the interceptor alone, default limiter from RTML_*) or
``exhausted`` (the same with ``code="resource_exhausted"``). KIND: ``sync`` (default: a
ThreadPoolExecutor of THREADS, 16 by default) or ``aio`` (grpc.aio, the handlers async).

- ``test.Mem/Alloc`` builds RTML_DEMO_PAYLOAD_MIB (24) MiB and holds it RTML_DEMO_HOLD (0.3) s.
- ``test.Mem/Decode`` decodes its message into 32x its size (every page touched) and holds it.
- ``test.Mem/DecodeStream`` (a request stream) does so with each message, holding all of them
  until the stream ends: a message whose decoded size does not fit must never reach it.
- ``test.Mem/AllocStream`` (a response stream) builds the same payload piece by piece as it
  answers, 4 MiB per response message (24 MiB in all), and holds it to the end.
- ``test.Mem/DecodeStreamCatching``: the same, but it catches any exception while it reads (as
  a careless handler does) and answers what it has: the call must still be refused.
"""

from __future__ import annotations

import asyncio
import sys
import time
from concurrent import futures
from typing import Any

import grpc

from rtml_ebpf.demo.app import HOLD, PAGE, build_payload

GROWTH = 32  # decoded bytes per message byte
OPTIONS = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]


def alloc(request: bytes, context: Any) -> bytes:
    chunks = build_payload()
    time.sleep(HOLD)
    return b"ok %d" % len(chunks)


def decoded(message: bytes) -> list[bytearray]:
    """``message`` decoded into GROWTH times its size, in 1 MiB pieces with every page touched
    (bytearray alone is calloc'd: its untouched pages would cost nothing)."""
    out, need = [], len(message) * GROWTH
    while need > 0:
        buf = bytearray(min(1 << 20, need))
        buf[::PAGE] = b"\x01" * ((len(buf) + PAGE - 1) // PAGE)
        out.append(buf)
        need -= len(buf)
    return out


def decode(request: bytes, context: Any) -> bytes:
    pieces = decoded(request)
    time.sleep(HOLD)
    return b"ok %d" % len(pieces)


def decode_stream(requests: Any, context: Any) -> bytes:
    held = [decoded(message) for message in requests]
    time.sleep(HOLD)
    return b"ok %d" % len(held)


def decode_stream_catching(requests: Any, context: Any) -> bytes:
    held = []
    try:
        for message in requests:
            held.append(decoded(message))
    except Exception:  # noqa: BLE001 - the careless handler this method stands for
        pass
    return b"ok %d" % len(held)


async def decode_async(request: bytes, context: Any) -> bytes:
    pieces = decoded(request)
    await asyncio.sleep(HOLD)
    return b"ok %d" % len(pieces)


async def decode_stream_async(requests: Any, context: Any) -> bytes:
    held = [decoded(message) async for message in requests]
    await asyncio.sleep(HOLD)
    return b"ok %d" % len(held)


async def decode_stream_catching_async(requests: Any, context: Any) -> bytes:
    held = []
    try:
        async for message in requests:
            held.append(decoded(message))
    except Exception:  # noqa: BLE001
        pass
    return b"ok %d" % len(held)


async def alloc_stream_async(request: bytes, context: Any) -> Any:
    held = []
    for _ in range(6):
        held.append(decoded(b"x" * ((4 << 20) // GROWTH)))
        yield b"piece"
        await asyncio.sleep(HOLD / 6)


def alloc_stream(request: bytes, context: Any) -> Any:
    held = []
    for _ in range(6):
        held.append(decoded(b"x" * ((4 << 20) // GROWTH)))
        yield b"piece"
        time.sleep(HOLD / 6)


def interceptor(guard: str, kind: str) -> list[Any]:
    if guard == "none":
        return []
    from rtml_ebpf.grpc import AsyncMemoryLimitInterceptor, MemoryLimitInterceptor

    code = "resource_exhausted" if guard == "exhausted" else "unavailable"
    return [AsyncMemoryLimitInterceptor(code=code) if kind == "aio" else MemoryLimitInterceptor(code=code)]


def methods(kind: str) -> Any:
    sync = kind != "aio"
    return grpc.method_handlers_generic_handler("test.Mem", {
        "Alloc": grpc.unary_unary_rpc_method_handler(alloc),
        "Decode": grpc.unary_unary_rpc_method_handler(decode if sync else decode_async),
        "DecodeStream": grpc.stream_unary_rpc_method_handler(decode_stream if sync else decode_stream_async),
        "AllocStream": grpc.unary_stream_rpc_method_handler(alloc_stream if sync else alloc_stream_async),
        "DecodeStreamCatching": grpc.stream_unary_rpc_method_handler(
            decode_stream_catching if sync else decode_stream_catching_async),
    })


async def serve_aio(port: int, guard: str) -> None:
    server = grpc.aio.server(interceptors=interceptor(guard, "aio"), options=OPTIONS, maximum_concurrent_rpcs=256)
    server.add_generic_rpc_handlers((methods("aio"),))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


def main() -> None:
    port, guard = int(sys.argv[1]), sys.argv[2]
    kind = sys.argv[3] if len(sys.argv) > 3 else "sync"
    threads = int(sys.argv[4]) if len(sys.argv) > 4 else 16
    if kind == "aio":
        asyncio.run(serve_aio(port, guard))
        return
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=threads), interceptors=interceptor(guard, kind),
                         options=OPTIONS, maximum_concurrent_rpcs=256)
    server.add_generic_rpc_handlers((methods(kind),))
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    server.wait_for_termination()


if __name__ == "__main__":
    main()
