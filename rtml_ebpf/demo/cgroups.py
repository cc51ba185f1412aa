"""The demo's child memory cgroups: one per row, with a limit, removed afterwards.

``rtml-ebpf demo`` runs each service in a fresh child of the calling process's own memory
cgroup, so it never touches cgroups that belong to anything else; on close the processes it
started there are killed by pid (by membership of the cgroup, never by name) and the cgroup is
removed. The tests (tests/support/cgroups.py) and the benchmarks (benchmarks/cgroups.py) build
on this module rather than keep a second copy; what only they need lives there, not here.
"""

from __future__ import annotations

import errno
import os
import shlex
import signal
import subprocess
import time
import uuid
from types import TracebackType
from typing import Any

from .. import _cgroup
from ..errors import RtmlError


def stop_process(proc: subprocess.Popen[Any], timeout: float = 15) -> int:
    """SIGTERM, then SIGKILL if it has not exited within ``timeout``; its exit status."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


class ChildCgroup:
    def __init__(self, limit: int | None = None, *, prefix: str = "rtml", parent: str | None = None) -> None:
        if parent is None:
            own = _cgroup.find_process_cgroup(require_accounting=False)
            parent, self.version = own.directory, own.version
        else:
            self.version = 2 if os.path.exists(os.path.join(parent, "cgroup.controllers")) else 1
        self.directory = os.path.join(parent, f"{prefix}-{uuid.uuid4().hex[:8]}")
        if self.version == 2:
            try:
                with open(os.path.join(parent, "cgroup.subtree_control"), "w") as f:
                    f.write("+memory")
            except OSError as exc:
                if exc.errno != errno.EBUSY:
                    raise
                raise RtmlError(
                    f"cannot enable the memory controller below {parent}: cgroup v2 forbids it while "
                    "processes live in that cgroup itself; run from the root cgroup (as root: "
                    "echo $$ > /sys/fs/cgroup/cgroup.procs, then start it from that shell)"
                ) from exc
        os.mkdir(self.directory)
        self.procs: list[subprocess.Popen[str]] = []
        if limit is not None:
            self.set_limit(limit)

    # -- files ---------------------------------------------------------------------------
    def _path(self, what: str) -> str:
        return os.path.join(self.directory, _cgroup.file_name(what, self.version))

    def set_limit(self, nbytes: int) -> None:
        with open(self._path("limit"), "w") as f:
            f.write(str(nbytes))

    def usage(self) -> int:
        return int(_cgroup.read_text(self._path("usage")))

    def peak(self) -> int | None:
        try:
            return int(_cgroup.read_text(self._path("peak")))
        except OSError:
            return None

    def oom_kills(self) -> int:
        return _cgroup.parse_flat_keyed(_cgroup.read_text(self._path("events"))).get("oom_kill", 0)

    # -- processes -----------------------------------------------------------------------
    def popen(self, argv: list[str], env: dict[str, str] | None = None, **kwargs: object) -> subprocess.Popen[str]:
        """Start argv inside this cgroup: the shell joins it, then execs argv."""
        procs = os.path.join(self.directory, "cgroup.procs")
        script = f"echo $$ > {shlex.quote(procs)} && exec " + " ".join(shlex.quote(a) for a in argv)
        p = subprocess.Popen(  # type: ignore[call-overload]
            ["/bin/sh", "-c", script], text=True, env={**os.environ, **(env or {})}, **kwargs
        )
        self.procs.append(p)
        return p  # type: ignore[no-any-return]

    def members(self) -> list[int]:
        """Pids in this cgroup (ours: everything in it was started by us or by what we started)."""
        try:
            with open(os.path.join(self.directory, "cgroup.procs")) as f:
                return [int(x) for x in f.read().split()]
        except FileNotFoundError:
            return []

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        # What they started (gunicorn/uvicorn workers) lives on in the cgroup: kill it by
        # membership of this cgroup, which we made, never by name.
        for _ in range(50):
            pids = self.members()
            if not pids:
                break
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.05)
        for _ in range(100):
            try:
                os.rmdir(self.directory)
                return
            except FileNotFoundError:
                return
            except OSError:
                time.sleep(0.05)  # exits still being reaped
        raise OSError(f"could not remove cgroup {self.directory}: processes remain in it")

    def __enter__(self) -> ChildCgroup:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
