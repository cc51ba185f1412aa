"""Shared fixtures: real memory cgroups under the test process's own, removed afterwards."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from rtml_ebpf import _cgroup

MiB = 1 << 20
IS_ROOT = os.geteuid() == 0


def bpf_unavailable() -> str | None:
    """Why the eBPF backend cannot run here, or None."""
    if not IS_ROOT:
        return "needs root (loads BPF programs and creates memory cgroups)"
    if not os.path.exists("/sys/kernel/btf/vmlinux"):
        return "kernel has no BTF (/sys/kernel/btf/vmlinux)"
    return None


def cgroups_unavailable() -> str | None:
    if not IS_ROOT:
        return "needs root to create memory cgroups"
    try:
        own = _cgroup.find_process_cgroup(require_accounting=False)
    except LookupError as exc:
        return f"no memory cgroup: {exc}"
    if not os.access(own.directory, os.W_OK):
        return f"cannot create cgroups under {own.directory}"
    return None


needs_bpf = pytest.mark.skipif(bpf_unavailable() is not None, reason=str(bpf_unavailable()))
needs_cgroups = pytest.mark.skipif(cgroups_unavailable() is not None, reason=str(cgroups_unavailable()))


class Cgroup:
    """A real memory cgroup directory we made, with helpers to run processes in it."""

    def __init__(self, directory: str, version: int) -> None:
        self.directory = directory
        self.version = version
        self.procs: list[subprocess.Popen[str]] = []

    def set_limit(self, nbytes: int) -> None:
        name = "memory.max" if self.version == 2 else "memory.limit_in_bytes"
        with open(os.path.join(self.directory, name), "w") as f:
            f.write(str(nbytes))

    def usage(self) -> int:
        name = "memory.current" if self.version == 2 else "memory.usage_in_bytes"
        with open(os.path.join(self.directory, name)) as f:
            return int(f.read())

    def oom_kills(self) -> int:
        name = "memory.events" if self.version == 2 else "memory.oom_control"
        return _cgroup.parse_flat_keyed(_cgroup.read_text(os.path.join(self.directory, name))).get("oom_kill", 0)

    def child(self, name: str) -> Cgroup:
        path = os.path.join(self.directory, name)
        os.mkdir(path)
        if self.version == 2:
            with open(os.path.join(self.directory, "cgroup.subtree_control"), "w") as f:
                f.write("+memory")
        return Cgroup(path, self.version)

    def popen(self, argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[str]:
        """Start argv as a member of this cgroup (it joins before exec)."""
        procs = os.path.join(self.directory, "cgroup.procs")
        script = f"echo $$ > {shlex.quote(procs)} && exec " + " ".join(shlex.quote(a) for a in argv)
        p = subprocess.Popen(["/bin/sh", "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, env={**os.environ, **(env or {})})
        self.procs.append(p)
        return p

    def hold(self) -> Holder:
        """A process in this cgroup whose memory the test grows and shrinks (see Holder)."""
        p = subprocess.Popen(
            ["/bin/sh", "-c", f"echo $$ > {shlex.quote(os.path.join(self.directory, 'cgroup.procs'))} && exec "
             f"{shlex.quote(sys.executable)} -m rtml_ebpf._workloads hold"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        self.procs.append(p)
        h = Holder(p)
        h.read()
        return h

    def run_python(self, args: list[str], env: dict[str, str] | None = None, timeout: float = 120) -> dict:
        p = self.popen([sys.executable, *args], env=env)
        out, err = p.communicate(timeout=timeout)
        if p.returncode != 0:
            raise AssertionError(f"child exited {p.returncode} (signal {-p.returncode if p.returncode < 0 else 0}); "
                                 f"stderr:\n{err[-3000:]}")
        return json.loads(out.strip().splitlines()[-1])

    def cleanup(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
                p.wait(timeout=10)
        for _ in range(50):
            try:
                os.rmdir(self.directory)
                return
            except FileNotFoundError:
                return
            except OSError:
                time.sleep(0.1)  # the last exits are still being reaped
        raise AssertionError(f"could not remove test cgroup {self.directory}")


class Holder:
    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc

    def read(self) -> int:
        assert self.proc.stdout is not None
        return int(json.loads(self.proc.stdout.readline())["held_mib"])

    def change(self, mib: int) -> int:
        """Grow (+) or shrink (-) by ``mib`` MiB; returns what is held once done."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"{mib}\n")
        self.proc.stdin.flush()
        return self.read()


def wait_until(predicate: object, timeout: float = 5.0, interval: float = 0.01) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return True
        time.sleep(interval)
    return bool(predicate())  # type: ignore[operator]


@contextmanager
def make_cgroup(limit: int | None = None, parent: Cgroup | None = None) -> Iterator[Cgroup]:
    if parent is None:
        own = _cgroup.find_process_cgroup(require_accounting=False)
        base = Cgroup(own.directory, own.version)
        cg = base.child(f"rtml-test-{uuid.uuid4().hex[:8]}")
    else:
        cg = parent.child(f"c-{uuid.uuid4().hex[:6]}")
    try:
        if limit is not None:
            cg.set_limit(limit)
        yield cg
    finally:
        cg.cleanup()


@pytest.fixture
def cgroup_factory() -> Iterator[object]:
    stack: list = []

    def make(limit: int | None = None, parent: Cgroup | None = None) -> Cgroup:
        cm = make_cgroup(limit, parent)
        cg = cm.__enter__()
        stack.append(cm)
        return cg

    yield make
    for cm in reversed(stack):
        cm.__exit__(None, None, None)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """RTML_NO_SKIP=1 (set inside the vmtest VM): a skipped test is a failure there."""
    outcome = yield
    report = outcome.get_result()
    if os.environ.get("RTML_NO_SKIP") == "1" and report.skipped and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        report.longrepr = f"skipped where every test must run (RTML_NO_SKIP=1): {report.longrepr}"
