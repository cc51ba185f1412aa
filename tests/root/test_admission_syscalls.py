"""The admission request path makes no system call where the verdict, the room and the thread meter
are mapped pages (the eBPF backend) and the shared ledger is a mapped file: thousands of admitted
requests (try_admit + finish, with a second process in the same ledger) under strace, between two
markers. The control: the same harness sees the poll backend's file reads on the same path."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from support.cgroups import needs_bpf
from support.strace import marker_lines, syscalls_between

pytestmark = pytest.mark.root
FUTEX = re.compile(r"^\d+\s+(futex\(|<\.\.\. futex resumed>)")

CHILD = textwrap.dedent(
    """
    import json, os, sys, time
    os.environ["RTML_LEDGER_DIR"] = sys.argv[3]
    from rtml_ebpf import Admission, Limiter
    from rtml_ebpf.admission.ledger import Ledger

    lim = Limiter(backend=sys.argv[1], metric="usage", threshold=0.99, relief=False, poll_interval=0.0)
    adm = Admission(lim, request_bytes=1 << 20)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # a sibling worker holding a reservation in the same ledger
        try:
            Ledger(lim.cgroup_id).claim(1 << 20, 1, 0, 1 << 20, 0)
            os.write(w, b"x")
            time.sleep(600)
        finally:
            os._exit(0)
    os.read(r, 1)
    for _ in range(200):  # the first request of the thread registers it with the meter
        adm.finish(adm.try_admit("GET /x"))
    # No forced GIL switch while the loop is measured: the publisher's and the enforcer's
    # hand-overs are futex calls on this thread that are not the request's (as test_hot_path).
    # A request that finds them idle wakes them (a futex each, at the first request after
    # idle, not per request): the requests just before the markers have done that.
    sys.setswitchinterval(100)
    for _ in range(100):
        adm.finish(adm.try_admit("GET /x"))
    before = adm.admitted
    os.getppid()  # marker: start
    for _ in range(int(sys.argv[2])):
        adm.finish(adm.try_admit("GET /x"))
    os.getppid()  # marker: end
    admitted = adm.admitted - before
    others = adm.stats().others_reserved_bytes
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    print(json.dumps({"admitted": admitted, "others": others, "meter": adm.stats().meter}))
    """
)


def requests_under_strace(backend: str, n: int, tmp_path: Path) -> tuple[list[str], dict[str, object]]:
    if shutil.which("strace") is None:
        pytest.fail("strace is not installed; scripts/setup.sh installs it")
    log = tmp_path / f"strace-{backend}.txt"
    ledgers = tmp_path / "ledgers"
    ledgers.mkdir(mode=0o700)
    out = subprocess.run(["strace", "-f", "-qq", "-o", str(log), sys.executable, "-c", CHILD, backend, str(n),
                          str(ledgers)], check=True, timeout=300, capture_output=True, text=True)
    lines = log.read_text().splitlines()
    marks = marker_lines(lines)
    # the program's own text is read with the marker in it: the last two are the calls
    assert len(marks) >= 2, f"markers not found in strace output ({len(marks)})"
    start, end = marks[-2], marks[-1]
    tid = lines[start].split()[0]
    assert lines[end].split()[0] == tid
    return syscalls_between(lines, start, end, tid), json.loads(out.stdout)


@needs_bpf
def test_admitted_requests_make_no_syscall(tmp_path: Path) -> None:
    n = 20_000
    between, result = requests_under_strace("ebpf", n, tmp_path)
    assert result == {"admitted": n, "others": 1 << 20, "meter": "ebpf"}  # shared, metered, admitted
    # Hand-overs of the GIL to the helper threads (publisher, enforcer, the limiter's monitor)
    # are futex calls on this thread, on their timers' cadence (a thread waiting for the GIL
    # since before the switch interval was raised still forces one), not per request.
    assert [line for line in between if not FUTEX.search(line)] == []
    assert len(between) <= n // 100, between[:20]


@needs_bpf
def test_the_strace_method_sees_the_poll_backends_reads(tmp_path: Path) -> None:
    # The control: poll_interval=0 re-reads the cgroup's files at each room() of the request path.
    between, result = requests_under_strace("poll", 200, tmp_path)
    assert result["admitted"] == 200
    assert sum("openat(" in line or "read(" in line for line in between) >= 200
