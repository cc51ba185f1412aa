"""What the agent process sets up before it serves: its fd limit, the host's cgroup namespace,
the Unix socket (bound under a staging name, renamed into place once listening) and the HTTP
listener with its access decision (health probes always; /metrics with a token, or for root on
loopback only).
"""

from __future__ import annotations

import ctypes
import logging
import os
import resource
import socket
from collections.abc import Callable

from ..errors import ConfigError
from . import metrics_access
from .conns import MAX_CONNECTIONS
from .health import Health
from .httpd import HttpServer

log = logging.getLogger("rtml_ebpf.agent")

DEFAULT_METRICS_ADDR = "127.0.0.1:9909"


def enter_host_cgroup_namespace() -> bool:
    """In a pod (its own cgroup namespace) with the host's pids, see cgroup paths as the host
    does: /proc/<pid>/cgroup of other pods' processes is then resolvable. True if it moved."""
    try:
        if os.stat("/proc/self/ns/cgroup").st_ino == os.stat("/proc/1/ns/cgroup").st_ino:
            return False
        fd = os.open("/proc/1/ns/cgroup", os.O_RDONLY)
    except OSError:
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.setns(fd, 0x02000000) != 0:  # CLONE_NEWCGROUP
            log.warning("rtml-ebpf agent: cannot enter the host cgroup namespace: %s",
                        os.strerror(ctypes.get_errno()))
            return False
    finally:
        os.close(fd)
    log.info("rtml-ebpf agent: entered the host cgroup namespace (pid 1's)")
    return True


def raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, MAX_CONNECTIONS * 2 + 1024) if hard != resource.RLIM_INFINITY else MAX_CONNECTIONS * 2 + 1024
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def listen_unix(path: str, mode: int) -> socket.socket:
    """The clients' socket at ``path``; ConfigError if another agent serves it (a stale one of
    an agent that died is replaced)."""
    os.makedirs(os.path.dirname(path) or ".", mode=0o755, exist_ok=True)
    if os.path.exists(path):
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            probe.settimeout(0.5)
            probe.connect(path)
            raise ConfigError(f"another rtml-ebpf agent already serves {path}; stop it first")
        except OSError:
            os.unlink(path)  # a stale socket of an agent that died
        finally:
            probe.close()
    # Bound under a temporary name and renamed into place once listening: a client never
    # finds the path before it can connect.
    staging = f"{path}.{os.getpid()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        if os.path.exists(staging):
            os.unlink(staging)
        sock.bind(staging)
        os.chmod(staging, mode)
        sock.listen(512)
        sock.setblocking(False)
        os.rename(staging, path)
    except BaseException:
        sock.close()
        raise
    return sock


def listen_http(addr: str, token_file: str | None, health: Health, render: Callable[[], bytes]) -> HttpServer | None:
    """The HTTP listener: health probes always; /metrics with a token, or without one for
    root on loopback only. A port that cannot be bound is logged, not fatal: the verdicts
    are the agent's first job."""
    host, _, port = addr.rpartition(":")
    served = True
    token: str | None = None
    if token_file is not None:
        try:
            token = metrics_access.read_token(token_file)
        except (OSError, ValueError) as exc:
            log.warning("rtml-ebpf agent: no metrics endpoint: cannot read the token in %s (%s)", token_file, exc)
            served = False
    elif not metrics_access.is_loopback(host):
        log.warning("rtml-ebpf agent: no metrics endpoint: %s is beyond loopback and every cgroup's figures "
                    "would be readable there; pass --metrics-token-file (a bearer token scrapers send)", addr)
        served = False
    try:
        sock = socket.create_server((host.strip("[]") or "127.0.0.1", int(port)), reuse_port=False)
    except (OSError, ValueError) as exc:
        log.warning("rtml-ebpf agent: no HTTP endpoint: cannot listen on %s (%s)", addr, exc)
        return None
    bound = sock.getsockname()
    server = HttpServer(sock, health, render, token, served)
    if served:
        log.info("rtml-ebpf agent: metrics at http://%s:%d/metrics (%s)", bound[0], bound[1],
                 "bearer token" if token else "root on loopback only")
    log.info("rtml-ebpf agent: health probes at http://%s:%d/healthz and /readyz", bound[0], bound[1])
    return server
