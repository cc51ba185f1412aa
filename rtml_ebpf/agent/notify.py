"""systemd's notify protocol in a few lines (no dependency): READY=1 once the agent serves,
WATCHDOG=1 from its loop (a stuck loop stops them, and systemd restarts the agent), STOPPING=1.
Nothing happens without $NOTIFY_SOCKET (not under systemd Type=notify)."""

from __future__ import annotations

import os
import socket

# a watchdog ping at this fraction of WatchdogSec (systemd's advice: less than half)
WATCHDOG_FRACTION = 0.4


class Notifier:
    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        path = env.get("NOTIFY_SOCKET", "")
        self.address = "\0" + path[1:] if path.startswith("@") else path
        try:
            usec = int(env.get("WATCHDOG_USEC", "0"))
        except ValueError:
            usec = 0
        watchdog_pid = env.get("WATCHDOG_PID", "")
        if watchdog_pid and watchdog_pid != str(os.getpid()):
            usec = 0  # meant for another process
        self.interval = usec / 1e6 * WATCHDOG_FRACTION if usec > 0 else 0.0
        self._next = 0.0
        self._sock: socket.socket | None = None

    def send(self, state: str) -> bool:
        if not self.address:
            return False
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.setblocking(False)  # the loop never waits on systemd either
            self._sock.sendto(state.encode(), self.address)
            return True
        except OSError:
            return False

    def watchdog(self, now: float) -> None:
        """From the loop: WATCHDOG=1 when due."""
        if self.interval and now >= self._next:
            self._next = now + self.interval
            self.send("WATCHDOG=1")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
