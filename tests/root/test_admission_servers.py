"""Budget admission on real servers, in real limited cgroups, under a real flood.

Each server runs the handler users write (allocate ~24 MiB, hold it 0.3 s, no check inside)
with only the middleware / interceptor added. The control, the same server unguarded under
the same flood, is OOM-killed; guarded, it has no OOM kill and serves.
"""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import pytest
from support.cgroups import MiB, interpreter_for_nobody, needs_bpf, needs_cgroups

from rtml_ebpf.demo.flood import Flood, RunResult, Server, free_port, gunicorn_server, uvicorn_server

pytestmark = [pytest.mark.root, needs_bpf, needs_cgroups]

LIMIT = 256 * MiB
DURATION = 8.0
ENV = {"RTML_THRESHOLD": "0.8", "RTML_METRIC": "usage"}


def flood(server: Server, guard: str, clients: int = 48) -> RunResult:
    return Flood(guard, guard, server, limit=LIMIT, duration=DURATION, clients=clients).run()


def assert_control_dies(r: RunResult) -> None:
    assert r.oom_kills >= 1, r  # without the guard this deployment is OOM-killed: the test can fail


def assert_guarded_lives(r: RunResult) -> None:
    assert r.oom_kills == 0, r
    assert r.served >= 10 and r.rejected > 0, r
    assert r.failed == 0, r
    assert r.peak_bytes < LIMIT, r


@pytest.mark.parametrize("guard", ["none", "admission"])
def test_gunicorn_prefork_gthread(guard: str) -> None:
    r = flood(gunicorn_server(guard, env=ENV), guard)
    assert_control_dies(r) if guard == "none" else assert_guarded_lives(r)


@pytest.mark.parametrize("guard", ["none", "admission"])
def test_gunicorn_sync_workers(guard: str) -> None:
    # 8 sync workers each serving one 32 MiB request at a time: 256 MiB of payloads at once.
    server = gunicorn_server(guard, workers=8, threads=1, worker_class="sync", preload=False,
                             env={**ENV, "RTML_DEMO_PAYLOAD_MIB": "32"})
    r = flood(server, guard, clients=24)
    assert_control_dies(r) if guard == "none" else assert_guarded_lives(r)


@pytest.mark.parametrize("guard", ["none", "admission"])
def test_uvicorn_two_workers(guard: str) -> None:
    r = flood(uvicorn_server(guard, workers=2, env=ENV), guard)
    assert_control_dies(r) if guard == "none" else assert_guarded_lives(r)


@pytest.mark.parametrize("guard", ["none", "admission"])
def test_threaded_grpc_server(guard: str) -> None:
    import grpc

    from rtml_ebpf.demo.cgroups import ChildCgroup
    from rtml_ebpf.demo.flood import wait_listening

    port = free_port()
    script = Path(__file__).resolve().parent.parent / "support" / "grpc_server.py"
    counts = {"ok": 0, "unavailable": 0, "failed": 0}
    lock = threading.Lock()
    stop = threading.Event()
    with ChildCgroup(LIMIT, prefix="rtml-grpc") as cg:
        proc = cg.popen([sys.executable, str(script), str(port), guard], env=ENV)
        wait_listening(port, proc)

        def client() -> None:
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                call = channel.unary_unary("/test.Mem/Alloc")
                while not stop.is_set():
                    try:
                        call(b"x", timeout=10)
                        key = "ok"
                    except grpc.RpcError as exc:
                        key = "unavailable" if exc.code() == grpc.StatusCode.UNAVAILABLE and \
                            "memory limit" in (exc.details() or "") else "failed"
                    with lock:
                        counts[key] += 1
                    if key != "ok":
                        time.sleep(0.05)

        threads = [threading.Thread(target=client, daemon=True) for _ in range(32)]
        for t in threads:
            t.start()
        time.sleep(DURATION)
        stop.set()
        for t in threads:
            t.join(timeout=15)
        oom = cg.oom_kills()
    if guard == "none":
        assert oom >= 1, counts
    else:
        assert oom == 0, counts
        assert counts["ok"] >= 10 and counts["unavailable"] > 0 and counts["failed"] == 0, counts


@pytest.mark.parametrize("guard", ["none", "admission"])
def test_gunicorn_prefork_as_an_unprivileged_user(guard: str) -> None:
    # Users are not root: the server runs as uid 65534 with no capabilities, so the middleware
    # runs on the poll backend and the kernel's per-thread fault counts. Same flood, same verdict.
    import site

    python = interpreter_for_nobody()
    paths = [str(Path(__file__).resolve().parent.parent.parent), *site.getsitepackages()]
    argv = ("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all", python, "-m",
            "gunicorn", "-b", "127.0.0.1:{port}", "-w", "4", "-k", "gthread", "--threads", "8", "--preload",
            "--log-level", "warning", "rtml_ebpf.demo.app:wsgi")
    env = {**ENV, "RTML_DEMO_GUARD": guard, "HOME": "/tmp", "PYTHONPATH": ":".join(paths)}
    r = flood(Server(argv, tuple(env.items())), guard)
    assert_control_dies(r) if guard == "none" else assert_guarded_lives(r)
