"""A WSGI app (Flask, Django and friends work the same way) behind the memory-limit middleware.

Run: python examples/wsgi_app.py   (serves one request to itself, prints it, exits)
Flask: app.wsgi_app = MemoryLimitMiddleware(app.wsgi_app)
"""

import threading
import urllib.request
from wsgiref.simple_server import make_server

import rtml_ebpf
from rtml_ebpf.wsgi import MemoryLimitMiddleware


def app(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"processed\n"]


limiter = rtml_ebpf.Limiter(threshold=0.85, soft_threshold=0.7)
wrapped = MemoryLimitMiddleware(app, limiter=limiter, shed_at="probabilistic")

if __name__ == "__main__":
    server = make_server("127.0.0.1", 0, wrapped)
    threading.Thread(target=server.handle_request, daemon=True).start()
    with urllib.request.urlopen(f"http://127.0.0.1:{server.server_port}/") as resp:
        print(resp.status, resp.read().decode().strip(), "| level:", limiter.level().name)
    server.server_close()
