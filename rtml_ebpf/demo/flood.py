"""One flood run: a server in a fresh memory cgroup, clients outside it, a sampler and a
supervisor that restarts a server the OOM killer took down (as kubelet or systemd would).

The server is any command that listens on ``127.0.0.1:{port}`` (the threaded demo service,
gunicorn, uvicorn); readiness is a TCP connect. Clients send ``GET /work`` in a loop with a
10 s timeout, honouring a short back-off after a 503; or, with ``mix``, requests drawn by weight
(method, path, body bytes: uploads whose size varies). A 503 whose body says the request was
ended (the enforcer's) is counted as ``ended``, apart from the rejections at the door.
"""

from __future__ import annotations

import http.client
import os
import random
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .cgroups import ChildCgroup

MiB = 1 << 20


@dataclass
class RunResult:
    name: str
    guard: str
    oom_kills: int = 0
    served: int = 0
    rejected: int = 0
    failed: int = 0
    restarts: int = 0
    ended: int = 0  # admitted, then ended by the enforcer to keep the process alive (503)
    peak_bytes: int = 0
    time_to_first_oom_s: float | None = None
    backend: str | None = None  # the guard's backend as the service reported it (/rtml-stats)
    oom_events: list[dict[str, Any]] = field(default_factory=list)  # the victims as the OOM hook saw them
    samples: list[tuple[float, int]] = field(default_factory=list)  # (seconds, usage bytes)


@dataclass(frozen=True)
class Server:
    """How to start the server: ``argv`` may contain ``{port}``; ``env`` is added."""

    argv: tuple[str, ...]
    env: tuple[tuple[str, str], ...] = ()

    def command(self, port: int) -> list[str]:
        return [a.replace("{port}", str(port)) for a in self.argv]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_listening(port: int, proc: subprocess.Popen[str], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited ({proc.returncode}) before listening on port {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"the server did not listen on port {port} within {timeout:.0f} s")


def service_backend(port: int) -> str | None:
    """The backend the service's guard runs on, from its /rtml-stats (None where it has none)."""
    import json

    for _ in range(20):  # the first request builds the default limiter, poll first then upgraded
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/rtml-stats")
            backend = json.loads(conn.getresponse().read()).get("backend")
            conn.close()
        except (OSError, ValueError, http.client.HTTPException):
            return None
        if backend not in (None, "poll"):
            return str(backend)
        time.sleep(0.1)
    return backend if isinstance(backend, str) else None


Mix = tuple[tuple[float, str, str, int], ...]  # (weight, method, path, body bytes)
ENDED_MARK = b"this request was ended"


class Flood:
    def __init__(self, name: str, guard: str, server: Server, *, limit: int, duration: float, clients: int,
                 path: str = "/work", mix: Mix | None = None) -> None:
        self.r = RunResult(name, guard)
        self.server = server
        self.limit = limit
        self.duration = duration
        self.clients = clients
        self.mix = mix or ((1.0, "GET", path, 0),)
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.port = free_port()
        self.port_ready = threading.Event()
        self.t0 = 0.0
        self.proc: subprocess.Popen[str] | None = None

    def start_service(self, cg: ChildCgroup) -> None:
        env = dict(self.server.env)
        log = open(os.environ["RTML_FLOOD_LOG"], "a") if os.environ.get("RTML_FLOOD_LOG") else None
        self.proc = cg.popen(self.server.command(self.port), env=env, stdout=subprocess.DEVNULL,
                             stderr=log or subprocess.DEVNULL)
        wait_listening(self.port, self.proc)
        if self.r.backend is None:
            self.r.backend = service_backend(self.port)
        self.port_ready.set()

    def supervise(self, cg: ChildCgroup) -> None:
        while not self.stop.is_set():
            assert self.proc is not None
            if self.proc.poll() is not None:
                self.port_ready.clear()
                with self.lock:
                    if self.r.time_to_first_oom_s is None and cg.oom_kills() > 0:
                        self.r.time_to_first_oom_s = round(time.monotonic() - self.t0, 2)
                    self.r.restarts += 1
                if self.stop.is_set():
                    return
                try:
                    self.start_service(cg)
                except RuntimeError:
                    time.sleep(0.2)
            elif self.r.time_to_first_oom_s is None and cg.oom_kills() > 0:
                with self.lock:  # a worker killed and replaced by its own master
                    self.r.time_to_first_oom_s = round(time.monotonic() - self.t0, 2)
            time.sleep(0.02)

    def sample(self, cg: ChildCgroup) -> None:
        while not self.stop.is_set():
            try:
                usage = cg.usage()
            except OSError:
                return
            self.r.samples.append((round(time.monotonic() - self.t0, 3), usage))
            self.r.peak_bytes = max(self.r.peak_bytes, usage)
            time.sleep(0.02)

    def client(self) -> None:
        rng = random.Random()
        weights = [m[0] for m in self.mix]
        bodies = {size: b"x" * size for _, _, _, size in self.mix if size}
        while not self.stop.is_set():
            if not self.port_ready.wait(timeout=0.2):
                continue
            _, method, path, size = rng.choices(self.mix, weights)[0]
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
                conn.request(method, path, body=bodies.get(size))
                resp = conn.getresponse()
                text = resp.read()
                status = resp.status
                conn.close()
            except (OSError, http.client.HTTPException):
                with self.lock:
                    self.r.failed += 1
                time.sleep(0.05)
                continue
            with self.lock:
                if status == 200:
                    self.r.served += 1
                elif status == 503 and ENDED_MARK in text:
                    self.r.ended += 1
                elif status == 503:
                    self.r.rejected += 1
                else:
                    self.r.failed += 1
            if status == 503:
                time.sleep(0.05)  # honour a short back-off, as clients with Retry-After do

    def run(self, on_tick: Callable[[Flood], object] | None = None, parent: str | None = None) -> RunResult:
        with ChildCgroup(self.limit, prefix="rtml-flood", parent=parent) as cg:
            self.start_service(cg)
            self.t0 = time.monotonic()
            threads = [threading.Thread(target=self.supervise, args=(cg,), daemon=True),
                       threading.Thread(target=self.sample, args=(cg,), daemon=True)]
            threads += [threading.Thread(target=self.client, daemon=True) for _ in range(self.clients)]
            for t in threads:
                t.start()
            try:
                while time.monotonic() - self.t0 < self.duration:
                    time.sleep(0.1)
                    if on_tick:
                        on_tick(self)
            finally:
                self.stop.set()
                for t in threads:
                    t.join(timeout=15)
                self.r.oom_kills = cg.oom_kills()
                peak = cg.peak()
                if peak:
                    self.r.peak_bytes = max(self.r.peak_bytes, peak)
        return self.r


def gunicorn_server(guard: str, *, workers: int = 4, threads: int = 8, worker_class: str = "gthread",
                    preload: bool = True, env: dict[str, str] | None = None,
                    app: str = "rtml_ebpf.demo.app:wsgi") -> Server:
    """The deployment of the issue that found the gap: gunicorn pre-fork, gthread workers."""
    import sys

    argv = [sys.executable, "-m", "gunicorn", "-b", "127.0.0.1:{port}", "-w", str(workers), "-k", worker_class,
            "--threads", str(threads), "--backlog", "256", "--graceful-timeout", "1", "-t", "60",
            "--log-level", "warning"]
    if preload:
        argv.append("--preload")
    argv.append(app)
    return Server(tuple(argv), tuple({**(env or {}), "RTML_DEMO_GUARD": guard,
                                      "PYTHONPATH": os.environ.get("PYTHONPATH", "")}.items()))


def uvicorn_server(guard: str, *, workers: int = 2, env: dict[str, str] | None = None,
                   app: str = "rtml_ebpf.demo.app:asgi") -> Server:
    import sys

    argv = (sys.executable, "-m", "uvicorn", "--host", "127.0.0.1", "--port", "{port}", "--workers", str(workers),
            "--log-level", "warning", "--no-access-log", app)
    return Server(argv, tuple({**(env or {}), "RTML_DEMO_GUARD": guard}.items()))
