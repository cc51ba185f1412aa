"""Real memory cgroups under the test process's own (removed afterwards), and why a test cannot run here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from rtml_ebpf import _cgroup
from rtml_ebpf.demo.cgroups import ChildCgroup

MiB = 1 << 20
IS_ROOT = os.geteuid() == 0
# The allocation workloads (shared with the benchmarks), run by path inside test cgroups.
WORKLOADS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                         "benchmarks", "workloads.py")


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


class Cgroup(ChildCgroup):
    """A real memory cgroup the test made (see rtml_ebpf.demo.cgroups), with test helpers."""

    def popen(self, argv: list[str], env: dict[str, str] | None = None,  # type: ignore[override]
              **kwargs: object) -> subprocess.Popen[str]:
        kwargs.setdefault("stdout", subprocess.PIPE)
        kwargs.setdefault("stderr", subprocess.PIPE)
        return super().popen(argv, env=env, **kwargs)

    def hold(self) -> Holder:
        """A process in this cgroup whose memory the test grows and shrinks (see Holder)."""
        p = self.popen([sys.executable, WORKLOADS, "hold"], stdin=subprocess.PIPE,
                       stderr=subprocess.DEVNULL, bufsize=1)
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
    """A child memory cgroup under the test process's own (or under ``parent``), removed after."""
    cg = Cgroup(limit, prefix="rtml-test" if parent is None else "c",
                parent=None if parent is None else parent.directory)
    try:
        yield cg
    finally:
        cg.close()


_opened: list[tuple[str, int]] = []


def open_checkout_to_nobody() -> None:
    """Tests run code of this checkout as uid 65534. A checkout made under a 0700 directory
    (``mktemp -d``, a home) is closed to it: grant others search on each directory above it and
    read+search on the checkout itself, for this session only (restored at exit)."""
    import atexit
    import stat

    if _opened or os.geteuid() != 0:
        return
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    path = repo
    while True:
        mode = stat.S_IMODE(os.stat(path).st_mode)
        want = mode | (stat.S_IROTH | stat.S_IXOTH if path == repo else stat.S_IXOTH)
        if want != mode:
            os.chmod(path, want)
            _opened.append((path, mode))
        if path == "/":
            break
        path = os.path.dirname(path)

    def restore() -> None:
        for p, m in reversed(_opened):
            try:
                os.chmod(p, m)
            except OSError:
                pass

    atexit.register(restore)


def interpreter_for_nobody() -> str:
    """A Python of this one's version that uid 65534 may run (the venv's may live under /root)."""
    import shutil

    open_checkout_to_nobody()
    want = f"python{sys.version_info.major}.{sys.version_info.minor}"
    for candidate in (sys.executable, shutil.which(want) or "", f"/usr/bin/{want}", "/usr/bin/python3"):
        if not candidate or not os.path.exists(candidate):
            continue
        out = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all",
                              candidate, "-c", "import sys; print(sys.version_info[:2])"],
                             capture_output=True, text=True)
        if out.returncode == 0 and out.stdout.strip() == str(tuple(sys.version_info[:2])):
            return candidate
    pytest.fail(f"no {want} that uid 65534 can run (the venv's is {sys.executable}); install python3 from the "
                "distribution")
