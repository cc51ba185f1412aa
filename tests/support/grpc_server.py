"""A threaded gRPC server whose one method allocates like the demo's HTTP handler.

    python tests/support/grpc_server.py PORT GUARD

GUARD: ``none`` or ``admission`` (the interceptor alone, default limiter from RTML_*).
Each call builds RTML_DEMO_PAYLOAD_MIB (24) MiB and holds it RTML_DEMO_HOLD (0.3) s.
"""

from __future__ import annotations

import sys
import time
from concurrent import futures
from typing import Any

import grpc

from rtml_ebpf.demo.app import HOLD, build_payload


def alloc(request: bytes, context: Any) -> bytes:
    chunks = build_payload()
    time.sleep(HOLD)
    return b"ok %d" % len(chunks)


def main() -> None:
    port, guard = int(sys.argv[1]), sys.argv[2]
    interceptors = []
    if guard == "admission":
        from rtml_ebpf.grpc import MemoryLimitInterceptor

        interceptors.append(MemoryLimitInterceptor())
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16), interceptors=interceptors,
                         maximum_concurrent_rpcs=256)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "test.Mem", {"Alloc": grpc.unary_unary_rpc_method_handler(alloc)}),))
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    server.wait_for_termination()


if __name__ == "__main__":
    main()
