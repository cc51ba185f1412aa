"""The ``meter`` op: a watching client asks the kernel's per-thread meter for one of its threads.

Request: {"v": 1, "op": "meter", "tid": N}   (N: the thread's id as the client sees it,
          threading.get_native_id(); on a connection that holds a watch)
Reply:   {"ok": true, "entry": i, "gen": g, "entries": 128, "abi": N, "pages": bool}
          + fds [meter page, begin page] the first time on a connection ("pages": true)
          {"ok": false, "error": "...", "full": true}   (no room: the connection stays; the thread
          uses getrusage)

The agent decides from the kernel, never from the request, that the tid is a thread of the
connection's peer process (SO_PEERCRED's pid, checked alive by its pidfd) and in the peer's
memory cgroup; the tid may be of the client's pid namespace (a pod's): /proc/<pid>/task/*/status
NSpid maps it to the host tid the programs see. Anything else is refused and, like every
malformed request, fails the connection.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable
from typing import Any

from ..ebpf import abi
from ..errors import CapacityError, CgroupNotFound, ConfigError
from .conns import Conn
from .leases import Leases
from .thread_pages import ThreadPages

Send = Callable[[int, dict[str, Any], "list[int] | None"], None]
PID_MAX = 1 << 22  # the kernel's PID_MAX_LIMIT: no tid is larger
MAX_TASKS_SCANNED = 65536  # a process with more threads than this is not looked through


def _ns_tid(status_path: str) -> int | None:
    """The innermost pid namespace's id of a task (the last NSpid field), None when unreadable."""
    try:
        with open(status_path, "rb") as f:
            for line in f.read(8192).splitlines():
                if line.startswith(b"NSpid:"):
                    fields = line.split()[1:]
                    return int(fields[-1]) if fields else None
    except (OSError, ValueError):
        return None
    return None


def host_tid(pid: int, tid: int) -> int | None:
    """The host tid of the thread of ``pid`` whose own-namespace tid is ``tid``, or None."""
    task_dir = f"/proc/{pid}/task"
    if _ns_tid(f"{task_dir}/{tid}/status") == tid:
        return tid  # the same pid namespace as ours (or the numbers agree)
    try:
        names = os.listdir(task_dir)
    except OSError:
        return None
    for name in names[:MAX_TASKS_SCANNED]:
        if name.isdigit() and _ns_tid(f"{task_dir}/{name}/status") == tid:
            return int(name)
    return None


def _memory_line(path: str) -> str:
    """A task's memory cgroup as its cgroup file says (the v1 memory line, else the v2 one)."""
    try:
        with open(path, "rb") as f:
            lines = f.read(65536).decode("utf-8", "replace").splitlines()
    except OSError:
        return ""
    chosen = [ln for ln in lines if ln.split(":")[1:2] and "memory" in ln.split(":")[1].split(",")]
    chosen = chosen or [ln for ln in lines if ln.startswith("0::")]
    return chosen[0].split(":", 2)[2] if chosen else ""


def _alive(pidfd: int) -> bool:
    if pidfd < 0:
        return True  # no pidfd before 6.5: the /proc checks are all we have
    libc = ctypes.CDLL(None, use_errno=True)
    return libc.syscall(424, pidfd, 0, None, 0) == 0 or ctypes.get_errno() == 1  # pidfd_send_signal(fd, 0)


def check_request(message: dict[str, Any]) -> int:
    """The tid asked for, or ConfigError naming what is wrong."""
    extra = set(message) - {"v", "op", "tid"}
    if extra & {"pid", "cgroup", "cgroup_id", "path"}:
        raise ConfigError("the agent decides your process and cgroup from your connection's credentials; "
                          "send only the tid of one of your threads")
    if extra:
        raise ConfigError(f"unknown request fields {sorted(extra)}")
    tid = message.get("tid")
    if isinstance(tid, bool) or not isinstance(tid, int) or not 1 <= tid <= PID_MAX:
        raise ConfigError(f"tid={tid!r}: the id of one of your threads (threading.get_native_id()), "
                          f"a whole number from 1 to {PID_MAX}")
    return tid


def thread_of_peer(conn: Conn, tid: int) -> int:
    """The host tid of the peer's thread ``tid``, checked from the kernel; ConfigError when it is
    not a thread of the peer process in the peer's memory cgroup."""
    pid = conn.peer.pid
    if pid <= 0:
        raise CgroupNotFound("the client's pid is not visible to the agent: run the agent in the host pid "
                             "namespace (hostPID: true)")
    host = host_tid(pid, tid)
    if host is None:
        raise ConfigError(f"tid={tid} is not a thread of your process (pid {pid} as the agent sees it); "
                          "ask for your own threads only")
    own = _memory_line(f"/proc/{pid}/cgroup")
    if not own or _memory_line(f"/proc/{pid}/task/{host}/cgroup") != own:
        raise ConfigError(f"thread {tid} is not in your process's memory cgroup; only threads charged to the "
                          "cgroup you watch can be metered")
    if not _alive(conn.peer.pidfd):
        raise CgroupNotFound(f"pid {pid} exited while its thread was being checked")
    return host


def answer(pages: ThreadPages, leases: Leases, fd: int, conn: Conn, message: dict[str, Any], send: Send) -> None:
    """Register one thread of the connection's peer and answer (see the module's docstring)."""
    tid = check_request(message)
    state = leases.slots.by_cgid.get(conn.cgid)
    if state is None:
        raise CgroupNotFound("your cgroup is no longer watched (removed); watch it again")
    host = thread_of_peer(conn, tid)
    try:
        entry, gen = pages.register(fd, conn.peer.pid, host, state.index)
    except CapacityError as exc:
        send(fd, {"ok": False, "error": str(exc), "full": True}, None)  # a soft no: the lease stays
        return
    fds: list[int] | None = None
    if fd not in pages.given:
        fds = list(pages.page_fds(state.index))
        pages.given.add(fd)
    send(fd, {"ok": True, "entry": entry, "gen": gen, "entries": abi.TPAGE_ENTRIES, "abi": abi.ABI_VERSION,
              "pages": fds is not None}, fds)
