"""Who may read the agent's /metrics, which carries every watched cgroup's figures.

* With a bearer token (``--metrics-token-file``): whoever sends it, from anywhere (what
  Prometheus does with ``authorization: {credentials_file: ...}``).
* Without one: only root, and only over loopback, where the kernel tells who the peer is (the
  owner of the connecting socket in /proc/net/tcp). An address beyond loopback without a token is
  not served at all: an unprivileged process must not read other cgroups' numbers.
"""

from __future__ import annotations

import hmac
import ipaddress
import socket
import struct

MAX_TOKEN = 4096


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]") or "127.0.0.1").is_loopback
    except ValueError:
        return host in ("localhost", "")


def read_token(path: str) -> str:
    """The token in ``path`` (surrounding whitespace dropped); OSError or ValueError says why not."""
    with open(path, encoding="utf-8") as f:
        token = f.read(MAX_TOKEN + 1).strip()
    if not token or len(token) > MAX_TOKEN or any(c.isspace() for c in token):
        raise ValueError(f"{path} must hold one token of 1 to {MAX_TOKEN} characters without spaces")
    return token


def _hex_endpoint(ip: str, port: int) -> str:
    """An address as /proc/net/tcp{,6} prints it (32-bit words in host order, hex)."""
    if ":" in ip:
        raw = socket.inet_pton(socket.AF_INET6, ip)
        words = struct.unpack("=4I", raw)
        return "".join(f"{w:08X}" for w in words) + f":{port:04X}"
    return f"{struct.unpack('=I', socket.inet_aton(ip))[0]:08X}:{port:04X}"


def loopback_peer_uid(conn: socket.socket, procfs: str = "/proc") -> int | None:
    """The uid owning the other end of a loopback TCP connection, from the kernel's socket
    table (the peer's socket is the entry whose local end is our remote end); None if not found."""
    peer, local = conn.getpeername(), conn.getsockname()
    want_local, want_remote = _hex_endpoint(peer[0], peer[1]), _hex_endpoint(local[0], local[1])
    table = "tcp6" if conn.family == socket.AF_INET6 else "tcp"
    try:
        with open(f"{procfs}/net/{table}") as f:
            next(f, None)
            for line in f:
                fields = line.split()
                if len(fields) > 7 and fields[1] == want_local and fields[2] == want_remote:
                    return int(fields[7])
    except OSError:
        return None
    return None


def decide(conn: socket.socket, headers: dict[str, str], token: str | None) -> tuple[str, str] | None:
    """None when this request may read the metrics, else (HTTP status, why)."""
    if token is not None:
        sent = headers.get("authorization", "")
        if hmac.compare_digest(sent.encode(), f"Bearer {token}".encode()):
            return None
        return "401 Unauthorized", "send the agent's metrics token: Authorization: Bearer <token>\n"
    uid = loopback_peer_uid(conn)
    if uid == 0:
        return None
    return "403 Forbidden", (f"the metrics of every cgroup are for root (this peer's uid: {uid}); run as root, or "
                             "start the agent with --metrics-token-file and send that token\n")
