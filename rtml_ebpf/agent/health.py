"""The agent's health, as probes ask it: ``/healthz`` (the loop is alive: it iterated within
LIVENESS_STALE) and ``/readyz`` (alive, and the programs are attached, the beat is fresh and
the socket is ours and serving). No figures of any cgroup, so no token is needed.

The loop publishes; the HTTP thread (httpd.py) only reads what was published, so a probe never
waits on the loop, and a stuck loop is seen as one (its last iteration grows old).
"""

from __future__ import annotations

import ctypes
import mmap
import os
import stat
import time

from ..ebpf import abi
from ..ebpf import libbpf as _libbpf

LIVENESS_STALE = 5.0  # seconds without a loop iteration: the loop is stuck
BEAT_STALE_NS = 2_000_000_000  # the beat ticks every few hundred ms (clients give up after 0.6 s)
STALL_ENV = "RTML_AGENT_TEST_STALL_FILE"  # TEST ONLY: while this file exists the loop sleeps


class Health:
    """What the loop published, read by the probes' thread (plain attribute reads)."""

    def __init__(self) -> None:
        self.loop_at = time.monotonic()
        self.problems: tuple[str, ...] = ("starting",)

    def loop_alive(self, now: float) -> None:
        self.loop_at = now

    def publish(self, problems: list[str]) -> None:
        self.problems = tuple(problems)

    def _stuck(self) -> str | None:
        if time.monotonic() - self.loop_at > LIVENESS_STALE:
            return f"the agent's loop has not iterated for over {LIVENESS_STALE:g} s"
        return None

    def healthz(self) -> tuple[str, bytes]:
        stuck = self._stuck()
        return ("503 Service Unavailable", f"unhealthy: {stuck}\n".encode()) if stuck else ("200 OK", b"ok\n")

    def readyz(self) -> tuple[str, bytes]:
        problems = [p for p in (self._stuck(), *self.problems) if p]
        if problems:
            return "503 Service Unavailable", ("not ready: " + "; ".join(problems) + "\n").encode()
        return "200 OK", b"ready\n"


def attached_programs() -> set[int]:
    """Ids of the programs some BPF link attaches now (the kernel's link table: a link whose last
    reference went, e.g. its pin removed under an agent that adopted it, is no longer there)."""
    lib = _libbpf.lib()
    out: set[int] = set()
    cur, nxt = 0, ctypes.c_uint32()
    while lib.bpf_link_get_next_id(cur, ctypes.byref(nxt)) == 0:
        cur = nxt.value
        fd = lib.bpf_link_get_fd_by_id(cur)
        if fd < 0:
            continue  # gone meanwhile
        try:
            out.add(_libbpf.link_prog_id(fd))
        except Exception:  # noqa: BLE001 - a link we cannot read says nothing about ours
            pass
        finally:
            os.close(fd)
    return out


class ReadyCheck:
    """The loop's side of /readyz: programs, beat, socket (a few syscalls, no client)."""

    def __init__(self, beat_fd: int, socket_path: str) -> None:
        self.beat = mmap.mmap(beat_fd, mmap.PAGESIZE, mmap.MAP_SHARED, mmap.PROT_READ)
        self.socket_path = socket_path
        st = os.lstat(socket_path)
        self.socket_id = (st.st_dev, st.st_ino)
        self.detached: list[str] = []  # hooks whose program no link attaches (as of the last look)

    def problems(self, prog_ids: dict[str, int]) -> list[str]:
        out = []
        live = attached_programs()
        gone = sorted(hook for hook, pid in prog_ids.items() if pid not in live)
        self.detached = gone
        if gone or not prog_ids:
            out.append(f"programs not attached: {', '.join(gone) or 'none loaded'}")
        beat_ns = int.from_bytes(self.beat[abi.Beat.beat_ns.offset:abi.Beat.beat_ns.offset + 8], "little")
        if time.monotonic_ns() - beat_ns > BEAT_STALE_NS:
            out.append("the beat is stale (clients would fall back to polling)")
        try:
            st = os.lstat(self.socket_path)
            ours = stat.S_ISSOCK(st.st_mode) and (st.st_dev, st.st_ino) == self.socket_id
        except OSError:
            ours = False
        if not ours:
            out.append(f"{self.socket_path} is no longer this agent's socket (removed or replaced)")
        return out

    def close(self) -> None:
        self.beat.close()


def stall_for_tests(path: str) -> None:
    """TEST ONLY (tests/root/test_agent_health.py): while the file named by
    $RTML_AGENT_TEST_STALL_FILE exists, the loop sleeps, as a loop stuck in a slow call would.
    The agent looks the variable up once at start; unset, this is never called."""
    while os.path.exists(path):
        time.sleep(0.05)
