"""A chunked upload refused partway reaches the client as the 503, not as a connection reset
(issue 19's review, item 3): a real uvicorn and gunicorn in a real 256 MiB cgroup, real clients
sending 64 MiB chunked bodies that are refused after about 6 MiB (tests/support/body_app.py: 32
bytes of memory per body byte). The middleware reads and drops the rest of the body after its 503
(within DRAIN_BYTES, DRAIN_SECONDS and DRAIN_IDLE of asgi.py and wsgi.py) before the server closes;
before, the server closed with the body unread and the kernel's reset reached http.client (0 of 20
saw the 503 on uvicorn, 0 of 10 on gunicorn; a client reading while it sends saw it, then the
reset, on uvicorn)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from support.cgroups import MiB, needs_bpf, needs_cgroups
from support.upload_clients import http_client_upload, raw_upload

from rtml_ebpf.demo.cgroups import ChildCgroup
from rtml_ebpf.demo.flood import free_port, wait_listening

pytestmark = [pytest.mark.root, needs_bpf, needs_cgroups]

SUPPORT = str(Path(__file__).resolve().parent.parent / "support")


SERVERS = {
    "asgi": lambda port: [sys.executable, "-m", "uvicorn", "--port", str(port), "--log-level", "warning",
                          "body_app:asgi_app"],
    "wsgi": lambda port: [sys.executable, "-m", "gunicorn", "-w", "1", "-k", "gthread", "--threads", "4",
                          "-b", f"127.0.0.1:{port}", "--log-level", "warning", "body_app:wsgi_app"],
}


@pytest.mark.parametrize("kind", ["asgi", "wsgi"])
def test_a_chunked_upload_refused_mid_body_gets_the_503_not_a_reset(kind: str) -> None:
    port = free_port()
    cmd = SERVERS[kind](port)
    with ChildCgroup(256 * MiB, prefix="rtml-drain") as cg:
        proc = cg.popen(cmd, env={"RTML_THRESHOLD": "0.8", "RTML_METRIC": "usage", "PYTHONPATH": SUPPORT},
                        cwd=SUPPORT)
        try:
            wait_listening(port, proc)
            sent_whole = [http_client_upload(port, 64 * MiB) for _ in range(8)]
            reading = [raw_upload(port, 64 * MiB) for _ in range(4)]
            small = http_client_upload(port, 256 << 10)  # 8 MiB of cost: fits
        finally:
            proc.terminate()
            proc.wait(20)
        assert cg.oom_kills() == 0
    assert sent_whole == [(503, "ok")] * 8, sent_whole
    assert reading == [(503, "ok")] * 4, reading  # the 503, and no reset after it
    assert small == (200, "ok"), small
