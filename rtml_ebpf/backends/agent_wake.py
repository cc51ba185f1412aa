"""The enforcer's wake for a client of the node agent: the agent consumes its programs' wake ring
and forwards each record of this client's cgroup on a connection of its own (op ``wake``,
rtml_ebpf/agent/protocol.py and wakes.py). The client tells the agent the level (bytes of use at
which its enforcer's next look could end something) and blocks on that connection.

The level is sent only when it moves enough to matter: at once when it falls (the enforcer must be
woken sooner) or turns on or off; when it rises, only past ``RAISE_SLACK`` (a level left a little
low costs one spare wake); never more than ``MAX_SENDS_PER_SECOND`` (the agent caps a wake
connection's messages): past that the backstop look covers.
"""

from __future__ import annotations

import os
import select
import socket
import time
from typing import Any

from ..agent import protocol
from ..config import PAGE_SIZE
from ..ebpf import abi
from ..ebpf.wake import WakeRecord
from ..errors import AgentUnavailable, ConfigError

CONNECT_TIMEOUT = 1.0
QUANTUM = 1 << 20  # levels are sent in whole MiB, rounded down: a little early, never late
RAISE_SLACK = 4 << 20
MAX_SENDS_PER_SECOND = 100


def used_bytes(words: Any) -> int:
    """Used bytes as the rules see them (the tightest ceiling's view), from a page's words: what
    the programs compare the level with (rtml_ebpf/ebpf/readings.py _used)."""
    usage, limit, headroom = words[abi.W_USAGE], words[abi.W_LIMIT], words[abi.W_HEADROOM]
    top, room = min(limit, words[abi.W_HIGH]), min(headroom, words[abi.W_HIGH_ROOM])
    used = usage if top >= abi.UNLIMITED_PAGES else top - room
    return max(0, int(used)) * PAGE_SIZE


class AgentWaker:
    """One enforcer's wake through the agent (the Waker of rtml_ebpf/admission/enforce.py)."""

    def __init__(self, path: str, words: Any, scope: str = "self", cgroup: str | None = None) -> None:
        self.words = words
        self.level_bytes = 0
        self._sent = 0
        self._window = (0.0, 0)
        self._pid = os.getpid()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            sock.settimeout(CONNECT_TIMEOUT)
            request: dict[str, Any] = {"v": protocol.VERSION, "op": "wake", "level": 0, "scope": scope}
            if cgroup is not None:
                request["cgroup"] = cgroup  # root only, as in watch
            try:
                sock.connect(path)
                sock.sendall(protocol.encode(request))
                data = sock.recv(protocol.MAX_MESSAGE)
            except OSError as exc:
                raise AgentUnavailable(f"the agent at {path} gave no wake connection: {exc.strerror or exc}") from None
            reply: dict[str, Any]
            try:
                reply = protocol.decode(data) if data else {"ok": False, "error": "the agent closed the connection"}
            except ConfigError as exc:
                reply = {"ok": False, "error": f"unreadable reply: {exc}"}
            if not reply.get("ok"):
                raise AgentUnavailable(f"the agent at {path} refused the wake: {reply.get('error')}")
            self.cgroup_id = int(reply.get("cgroup_id") or 0)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        self.sock: socket.socket | None = sock

    def set_margin(self, margin: int | None) -> None:
        """Wake when use has grown by ``margin`` bytes from now (at once when <= 0); None: off."""
        if margin is None:
            level = 0
        else:
            level = max(PAGE_SIZE, (used_bytes(self.words) + margin) // QUANTUM * QUANTUM)
        self.level_bytes = level
        sent = self._sent
        if level == sent or (sent and level and sent < level < sent + RAISE_SLACK):
            return
        now = time.monotonic()
        start, count = self._window
        if now - start >= 1.0:
            start, count = now, 0
        if count >= MAX_SENDS_PER_SECOND:
            return
        self._window = (start, count + 1)
        if self.sock is None:
            return
        try:
            self.sock.send(protocol.encode({"v": protocol.VERSION, "op": "wake", "level": level}))
        except (BlockingIOError, InterruptedError):
            return  # the agent is behind: the next look sends it again
        except OSError as exc:
            raise AgentUnavailable(f"the agent's wake connection failed: {exc.strerror or exc}") from None
        self._sent = level

    def wait(self, timeout: float) -> list[WakeRecord] | None:
        """Records the agent forwarded ([] at the timeout); raises when the agent closed the
        connection (the enforcer then polls)."""
        sock = self.sock
        if sock is None:
            time.sleep(timeout)
            return None
        got = self._read(sock)
        if got:
            return got
        ready, _, _ = select.select([sock], [], [], max(0.0, timeout))
        return self._read(sock) if ready else []

    def _read(self, sock: socket.socket) -> list[WakeRecord]:
        out: list[WakeRecord] = []
        while True:
            try:
                data = sock.recv(protocol.MAX_MESSAGE)
            except (BlockingIOError, InterruptedError):
                return out
            except OSError as exc:
                raise AgentUnavailable(f"the agent's wake connection failed: {exc.strerror or exc}") from None
            if not data:
                raise AgentUnavailable("the agent closed the wake connection")
            try:
                m = protocol.decode(data)
            except ConfigError:
                continue
            if m.get("ok") is False:  # the agent failed the connection: it says why
                raise AgentUnavailable(f"the agent ended the wake: {m.get('error')}")
            tid = m.get("tid") or 0
            out.append(WakeRecord(int(m.get("cgroup_id") or 0), int(tid), self._pid if tid else 0,
                                  int(m.get("used") or 0), int(m.get("level") or 0), int(m.get("ns") or 0)))

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        self.level_bytes = 0


def waker_of(backend: Any, flag: Any, poll: float) -> AgentWaker | None:
    """The wake for an AgentBackend's rule ``flag`` (a Lease): a connection of its own to the same
    agent, naming the cgroup as the watch did. None when the lease is retired (the agent lost)."""
    if getattr(flag, "retired", True) or backend.lost is not None:
        return None
    return AgentWaker(backend.path, flag.words, backend._scope, backend._other)  # noqa: SLF001 - its own wing
