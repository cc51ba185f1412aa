"""The node's shared load when no node agent runs (issue 20): one set of programs, however many
root processes are guarded.

The first root process whose ``auto`` Limiter finds no node agent starts one on demand: the
same agent (rtml_ebpf/agent/server.py), on a private socket (``/run/rtml-ebpf-shared/agent.sock``,
mode 0600 in a 0700 root directory) and a private pin directory
(``/sys/fs/bpf/rtml-ebpf-shared``), detached from the process that started it (its own session,
moved to the memory hierarchy's root so it never holds a service's cgroup). Every other root
process, and the first one, is its client: a frozen page per cgroup (the ns check is the same
one-byte read), and, root only, the pinned ``threads`` array for the kernel's per-thread meter.

- Start-up: a process that finds it answering connects and maps a page (a few ms). Who starts
  it is settled by ``flock`` on ``lock`` in the private directory: one starts it, the others
  wait for its socket, so unrelated processes never load twice.
- The programs are pinned: a SIGKILL of the process that started it, or of the shared agent
  itself, leaves every client's page fresh (the programs keep running); the next Limiter (or a
  client's reconnect) starts another, which adopts the pins with no gap.
- The last one out cleans up: with no client connected for ``IDLE_EXIT`` seconds the shared
  agent unpins (the programs detach) and exits; it holds the lock while it does, so a
  process arriving then waits and starts a new one.

``RTML_SHARED=0`` turns it off (``auto`` then loads the process's own programs, as before);
``RTML_SHARED_DIR`` and ``RTML_SHARED_PIN_DIR`` move it (tests use private ones).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator

from .. import _cgroup
from .._private_dir import private_dir
from ..ebpf import probes
from ..errors import AgentUnavailable, PermissionDenied, RtmlError
from .agent import AgentBackend
from .base import Backend

log = logging.getLogger("rtml_ebpf")

SHARED_ENV = "RTML_SHARED"
DIR_ENV = "RTML_SHARED_DIR"
PIN_ENV = "RTML_SHARED_PIN_DIR"
IDLE_ENV = "RTML_SHARED_IDLE"
DEFAULT_DIR = "/run/rtml-ebpf-shared"
DEFAULT_PIN_DIR = "/sys/fs/bpf/rtml-ebpf-shared"
IDLE_EXIT = 10.0  # seconds with no client before the shared agent unloads and exits
CAPACITY = 1024  # cgroups the shared load can watch (the node agent's --max-cgroups)
START_TIMEOUT = 60.0  # the load takes ~250 ms here; software-emulated VMs take seconds
LOG_KEEP = 1 << 20  # bytes of agent.log kept before it is rotated (at a start)
NEVER = "\x00"  # a --watch glob no cgroup path matches: the shared agent watches its clients' cgroups only

Registered = tuple[Backend, object, object | None]


def shared_dir() -> str:
    return os.environ.get(DIR_ENV) or DEFAULT_DIR


def pin_dir() -> str:
    return os.environ.get(PIN_ENV) or DEFAULT_PIN_DIR


def socket_path() -> str:
    return os.path.join(shared_dir(), "agent.sock")


def unusable(cg: _cgroup.MemoryCgroup) -> str | None:
    """Why this process cannot use the shared load for ``cg``, or None when it can. Its clients
    are root, and root may watch any cgroup there (the agent checks the uid from the kernel)."""
    if os.environ.get(SHARED_ENV, "1") == "0":
        return f"the node's shared load is off ({SHARED_ENV}=0)"
    try:
        probes.check_privileges()
    except PermissionDenied as exc:
        return f"the node's shared load is for root processes ({exc})"
    return None


def answers(path: str | None = None) -> bool:
    """True when an agent listens on the shared socket."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    try:
        sock.settimeout(1.0)
        sock.connect(path or socket_path())
        return True
    except OSError:
        return False
    finally:
        sock.close()


def backend(cg: _cgroup.MemoryCgroup, why: str) -> Backend:
    # (the backend reads /proc once to know whether cg is ours: root may guard another cgroup)
    return AgentBackend(cg, why, path=socket_path(), pin_dir=pin_dir(), respawn=ensure)


def join(cg: _cgroup.MemoryCgroup, why: str, register: Callable[[Backend], Registered]) -> Registered:
    """Register with the shared agent, starting it first when nothing answers."""
    reason = f"{why}; the node's shared load (agent started on demand at {socket_path()}, pins under {pin_dir()})"
    first = backend(cg, reason)
    try:
        return register(first)
    except AgentUnavailable as exc:
        first.close()
        if "distinct thresholds" in str(exc):
            raise
    except BaseException:
        first.close()
        raise
    ensure()
    again = backend(cg, reason)
    try:
        return register(again)
    except BaseException:
        again.close()
        raise


_thread_lock = threading.Lock()


def _after_fork_in_child() -> None:
    global _thread_lock
    _thread_lock = threading.Lock()  # a fork while another thread started the agent


os.register_at_fork(after_in_child=_after_fork_in_child)


@contextlib.contextmanager
def _locked() -> Iterator[None]:
    """The start lock: one process starts the shared agent, the others wait for it. A POSIX
    record lock (lockf): owned by the process, so a child forked while we hold it does not
    hold it too (a flock would be shared with the child through the inherited descriptor);
    threads of one process take the thread lock first (record locks do not exclude them)."""
    with _thread_lock:
        with _file_locked():
            yield


@contextlib.contextmanager
def _file_locked() -> Iterator[None]:
    where = shared_dir()
    dfd = private_dir(os.path.dirname(where) or "/", os.path.basename(where))
    try:
        fd = os.open("lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dfd)
    finally:
        os.close(dfd)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def ensure() -> None:
    """Start the shared agent unless one answers; return once it does."""
    with _locked():
        if answers():
            return
        pid = _spawn()
        deadline = time.monotonic() + START_TIMEOUT
        while not answers():
            if not os.path.exists(f"/proc/{pid}") or time.monotonic() > deadline:
                raise AgentUnavailable(f"the node's shared agent (pid {pid}) did not start: "
                                       f"{_tail(os.path.join(shared_dir(), 'agent.log'))}")
            time.sleep(0.01)


def _tail(path: str, n: int = 600) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - n))
            return f.read().decode(errors="replace").strip() or "(nothing logged)"
    except OSError as exc:
        return f"(no log: {exc.strerror})"


def _spawn() -> int:
    """Run ``main(["serve"])`` of this module detached (it forks once more and writes
    the pid of the process that stays into ``agent.pid``). By posix_spawn, with no pipe of
    any kind: a process forked from another thread of ours meanwhile would inherit a write end
    and hold our read open, while we hold the start lock it waits for (subprocess.Popen reads
    such a pipe for exec errors: that deadlock was found by a fork during the default
    limiter's background start). The spawned process closes every inherited descriptor first."""
    package_parent = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [package_parent, *[p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]])}
    log_path = os.path.join(shared_dir(), "agent.log")
    pid_path = os.path.join(shared_dir(), "agent.pid")
    with contextlib.suppress(OSError):  # /run is memory: keep one previous log, not every one
        if os.stat(log_path).st_size > LOG_KEEP:
            os.replace(log_path, log_path + ".1")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(pid_path)
    # -c, not -m: the package imports this module, and runpy warns when asked to run it again
    command = ("import os, sys; os.closerange(3, os.sysconf('SC_OPEN_MAX')); os.chdir('/'); "
               "from rtml_ebpf.backends.shared import main; sys.exit(main(['serve']))")
    with open(log_path, "ab") as out:
        os.fchmod(out.fileno(), 0o600)
        actions = [(os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                   (os.POSIX_SPAWN_DUP2, out.fileno(), 1), (os.POSIX_SPAWN_DUP2, out.fileno(), 2)]
        try:
            pid = os.posix_spawn(sys.executable, [sys.executable, "-c", command], env, file_actions=actions,
                                 setsid=True)
        except OSError as exc:
            raise AgentUnavailable(f"the node's shared agent could not be started: {exc}") from None
    deadline = time.monotonic() + START_TIMEOUT
    try:
        while os.waitpid(pid, os.WNOHANG) == (0, 0):  # the first process forks the agent and exits
            if time.monotonic() > deadline:
                raise AgentUnavailable(f"the node's shared agent did not start: {_tail(log_path)}")
            time.sleep(0.005)
    except ChildProcessError:
        pass  # reaped by the application's own SIGCHLD handling: the pid file tells

    try:
        with open(pid_path) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        raise AgentUnavailable(f"the node's shared agent did not start: {_tail(log_path)}") from None


def _leave_client_cgroup() -> None:
    """Move to the root of the memory hierarchy this process sees: the shared agent's memory is
    nobody's service, and it must not keep a client's cgroup from being removed."""
    try:
        from ..agent.scan import memory_mount

        root = memory_mount().mount_point
        with open(os.path.join(root, "cgroup.procs"), "w") as f:
            f.write(str(os.getpid()))
    except (OSError, RtmlError) as exc:
        log.warning("rtml-ebpf shared agent: staying in the cgroup of the process that started it (%s)", exc)


def serve() -> int:
    """The shared agent: an agent on the private socket and pins that exits when idle."""
    from ..agent.server import Agent, AgentConfig
    from ..config import env_hooks

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s",
                        stream=sys.stderr)
    _leave_client_cgroup()
    idle_exit = float(os.environ.get(IDLE_ENV) or IDLE_EXIT)
    config = AgentConfig(socket_path=socket_path(), capacity=CAPACITY, globs=(NEVER,), pin_dir=pin_dir(),
                         hooks=env_hooks(), socket_mode=0o600, metrics_addr=None)
    agent = Agent(config)

    def stop(signum: int, frame: object) -> None:
        agent.stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    unpin = False
    idle_since = time.monotonic()
    try:
        while not agent.stopping:
            try:
                agent.step(0.1)
            except Exception:  # noqa: BLE001 - as the node agent: periodic work is retried
                log.exception("rtml-ebpf shared agent: loop step failed; serving on")
                time.sleep(0.1)
            if len(agent.conns):
                idle_since = time.monotonic()
            elif time.monotonic() - idle_since >= idle_exit:
                with _locked():  # nobody starts or joins while we go
                    agent.step(0)  # a client in the accept queue keeps us
                    if not len(agent.conns):
                        log.info("rtml-ebpf shared agent: no client for %.0f s: unloading", idle_exit)
                        unpin = True
                        agent.close(unpin=True)
                        return 0
                idle_since = time.monotonic()
    finally:
        if not unpin:
            agent.close(unpin=False)  # stopped by a signal: the pins stay for the next one
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rtml_ebpf.backends.shared",
                                     description="the node's shared load (started on demand by the library)")
    parser.add_argument("what", choices=("serve",))
    parser.parse_args(argv)
    pid = os.fork()
    if pid:
        tmp = os.path.join(shared_dir(), f"agent.pid.{pid}")
        with open(tmp, "w") as f:
            f.write(str(pid))
        os.replace(tmp, os.path.join(shared_dir(), "agent.pid"))  # the starter waits for this one's socket
        return 0
    os.setsid()
    return serve()


if __name__ == "__main__":
    sys.exit(main())


def agent_pids(directory: str) -> list[int]:
    """Pids of shared agents serving ``directory`` (their environment names it): for the tests and
    benchmarks that start one on a private place and must stop it by pid."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"rtml_ebpf.backends.shared import main" not in f.read():
                    continue
            with open(f"/proc/{pid}/environ", "rb") as f:
                if f"{DIR_ENV}={directory}".encode() not in f.read().split(b"\0"):
                    continue
        except OSError:
            continue
        found.append(int(pid))
    return found
