"""A gRPC server whose calls end with UNAVAILABLE (retried by clients) while memory is short.

Run: python examples/grpc_server.py   (one call to itself, prints it, exits)
"""

from concurrent import futures

import grpc

from rtml_ebpf.grpc import MemoryLimitInterceptor


def ping(request: bytes, context) -> bytes:
    return b"pong"


def serve() -> tuple[grpc.Server, int]:
    server = grpc.server(futures.ThreadPoolExecutor(4), interceptors=[MemoryLimitInterceptor()])
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("demo.Echo", {"Ping": grpc.unary_unary_rpc_method_handler(ping)}),)
    )
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, port


if __name__ == "__main__":
    server, port = serve()
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        print(channel.unary_unary("/demo.Echo/Ping")(b"ping", timeout=10).decode())
    server.stop(None)
