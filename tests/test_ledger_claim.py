"""The ledger's lock-free request path (rtml_ebpf/admission/ledger_fast.py), with real processes on
one real ledger file: no two processes are ever admitted into the same bytes, no row write of one
process is lost while others write theirs, and the C sums (rtml_ebpf/_hot.c) agree with Python's.
The control shows the harness catches a protocol without the claim-first order."""

from __future__ import annotations

import mmap
import os
import random
import struct
import time
from pathlib import Path

import pytest

from rtml_ebpf._hot import ledger_claim, ledger_others  # the install builds it (setup.py)
from rtml_ebpf.admission import ledger as _ledger
from rtml_ebpf.admission import ledger_fast
from rtml_ebpf.admission.ledger import Ledger
from rtml_ebpf.admission.ledger_layout import FIELDS, H_USED, HEADER, RESERVED, ROWS, SIZE, UPDATED

CGID = 92_000_000 + os.getpid()  # an id no real cgroup of this host has
PROCS = 4
SECONDS = 1.5
IMPLS = {"c": (ledger_others, ledger_claim), "python": (ledger_fast._others_py, ledger_fast._claim_py)}


def _children(body: object, tmp_path: Path, shared: mmap.mmap) -> list[int]:
    pids = []
    for p in range(PROCS):
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                body(p, Ledger(CGID, str(tmp_path)), memoryview(shared).cast("q"))  # type: ignore[operator]
                code = 0
            finally:
                os._exit(code)
        pids.append(pid)
    return pids


def _wait(pids: list[int]) -> None:
    for pid in pids:
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0


def _exclusion(tmp_path: Path, claim_first: bool) -> tuple[list[int], int]:
    """PROCS processes contend for a budget of one request: each claims, and when the others
    hold nothing it is admitted, raises its flag, looks at the others' flags (another raised:
    two admitted at once), lowers it and gives the claim back. Returns (admitted per process,
    overlaps seen)."""
    shared = mmap.mmap(-1, 8 * (2 * PROCS + 1))  # flags, admitted counts, overlaps

    def body(p: int, ledger: Ledger, q: memoryview) -> None:
        ledger.open()
        end = time.monotonic() + SECONDS
        while time.monotonic() < end:
            if claim_first:
                admitted = ledger.claim(1, 1, 0, 0, 0)[0] == 0
            else:  # the broken order: look, then claim
                admitted = ledger.look()[0] == 0
                ledger.claim(1, 1, 0, 0, 0)
            if admitted:
                q[p] = 1
                if any(q[o] for o in range(PROCS) if o != p):
                    q[2 * PROCS] += 1  # racy count, but nonzero whenever one was seen
                q[PROCS + p] += 1
                q[p] = 0
            ledger.claim(0, 0, 0, 0, 0)
        ledger.close()

    _wait(_children(body, tmp_path, shared))
    q = memoryview(shared).cast("q")
    return [q[PROCS + p] for p in range(PROCS)], q[2 * PROCS]


@pytest.mark.parametrize("impl", sorted(IMPLS))
def test_two_processes_are_never_admitted_into_the_same_bytes(tmp_path: Path, impl: str,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ledger_fast, "others", IMPLS[impl][0])
    monkeypatch.setattr(ledger_fast, "claim", IMPLS[impl][1])
    admitted, overlaps = _exclusion(tmp_path, claim_first=True)
    assert overlaps == 0
    assert all(n > 0 for n in admitted), admitted  # and every process got its turns


def test_the_exclusion_harness_catches_look_then_claim(tmp_path: Path) -> None:
    # The control: the same processes, deciding before they claim, are admitted together.
    admitted, overlaps = _exclusion(tmp_path, claim_first=False)
    assert sum(admitted) > 0
    assert overlaps > 0, f"no overlap seen in {sum(admitted)} admissions"


@pytest.mark.parametrize("impl", sorted(IMPLS))
def test_no_row_write_is_lost_under_concurrent_writers(tmp_path: Path, impl: str,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Each process rewrites its row as fast as it can with values the others can check (every
    field a multiple of its process number + 1, never above a bound), then leaves a final value:
    the sums read meanwhile are never torn, and the final sums are exact."""
    monkeypatch.setattr(ledger_fast, "others", IMPLS[impl][0])
    monkeypatch.setattr(ledger_fast, "claim", IMPLS[impl][1])
    shared = mmap.mmap(-1, 8 * (2 * PROCS + 1))  # done flags, bad sums seen, (spare)
    bound = 1 << 40

    def body(p: int, ledger: Ledger, q: memoryview) -> None:
        ledger.open()
        unit = p + 1
        end = time.monotonic() + SECONDS
        i = 0
        while time.monotonic() < end:
            i += 1
            v = unit * (i % (bound // unit))
            seen = ledger.claim(v, unit * (i % 1000), unit * (i % 7), v, unit)
            if not (0 <= seen[0] <= PROCS * bound and 0 <= seen[1] <= PROCS * 1000 * PROCS):
                q[PROCS + p] += 1
        ledger.claim(unit << 20, unit, unit, unit << 20, unit)  # the final word
        q[p] = 1
        while q[2 * PROCS] == 0:  # hold the row until the parent has read it
            time.sleep(0.01)
        ledger.close()

    pids = _children(body, tmp_path, shared)
    q = memoryview(shared).cast("q")
    try:
        deadline = time.monotonic() + SECONDS + 30
        while not all(q[p] for p in range(PROCS)) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert all(q[p] for p in range(PROCS)), "a writer did not finish"
        totals = _ledger.read_totals(CGID, str(tmp_path))
        assert totals is not None
        units = range(1, PROCS + 1)
        assert totals == (sum(u << 20 for u in units), sum(units), sum(units), PROCS << 20)
        assert [q[PROCS + p] for p in range(PROCS)] == [0] * PROCS
    finally:
        q[2 * PROCS] = 1
        _wait(pids)


def test_the_c_sums_are_the_python_sums() -> None:
    """ledger_others (C) against the memoryview slices, on random ledgers and every own row."""
    rng = random.Random(7)
    for _ in range(200):
        mm = mmap.mmap(-1, SIZE)
        rows = memoryview(mm).cast("q")
        used = rng.randint(0, ROWS)
        rows[H_USED] = used
        for r in range(ROWS):  # rows past the mark hold leftovers that must not count
            for f in range(FIELDS):
                rows[HEADER + r * FIELDS + f] = rng.randint(0, 1 << 40)
        for own in (-1, 0, used - 1, rng.randint(0, ROWS - 1)):
            assert ledger_others(rows, own) == ledger_fast._others_py(rows, own)
        # the claim: the same row written (but the time of the write), the same sums after
        own, values = rng.randint(0, ROWS - 1), [rng.randint(-5, 1 << 40) for _ in range(5)]
        twin = mmap.mmap(-1, SIZE)
        twin[:] = mm[:]
        twin_rows = memoryview(twin).cast("q")
        assert ledger_claim(rows, own, *values) == ledger_fast._claim_py(twin_rows, own, *values)
        base = HEADER + own * FIELDS
        assert rows[base + RESERVED] == max(0, values[0])
        rows[base + UPDATED] = twin_rows[base + UPDATED] = 0
        assert rows.tolist() == twin_rows.tolist()
        for view, m in ((rows, mm), (twin_rows, twin)):
            view.release()
            m.close()


def test_the_c_calls_refuse_a_buffer_smaller_than_a_ledger_and_a_row_outside_it() -> None:
    with pytest.raises(ValueError, match="smaller than the ledger"):
        ledger_others(bytearray(struct.calcsize("q") * HEADER), 0)
    with pytest.raises(ValueError, match="smaller than the ledger"):
        ledger_claim(bytearray(struct.calcsize("q") * HEADER), 0, 1, 1, 0, 0, 0)
    with pytest.raises(ValueError, match="outside a ledger"):
        ledger_claim(bytearray(SIZE), ROWS, 1, 1, 0, 0, 0)


def test_a_killed_workers_reservation_is_reaped_while_requests_are_refused(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Reaping is the publisher thread's now (off the request path): a worker SIGKILLed holding the
    whole budget must not refuse this process's requests for longer than the reap interval, even
    when every request since is refused (nothing in flight here to keep the publisher running)."""
    from rtml_ebpf import Admission, Limiter
    from rtml_ebpf.admission.ledger import REAP_INTERVAL

    monkeypatch.setenv("RTML_LEDGER_DIR", str(tmp_path))
    probe = Limiter(backend="poll", metric="usage", relief=False)
    usage = probe.stats().usage_bytes
    probe.close()
    with Limiter(backend="poll", threshold=usage + 100 * (1 << 20), metric="usage", relief=False,
                 poll_interval=0) as lim:
        adm = Admission(lim, request_bytes=30 << 20)
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # a sibling worker in the middle of a request that reserved everything
            try:
                Ledger(lim.cgroup_id).claim(1 << 40, 1, 0, 30 << 20, 0)
                os.write(w, b"x")
                time.sleep(600)
            finally:
                os._exit(0)
        try:
            os.read(r, 1)
            assert adm.try_admit("GET /a") is None  # its reservation counts here
            assert adm.stats().rejected_budget == 1
        finally:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
        deadline = time.monotonic() + REAP_INTERVAL + 2.0
        ticket = None
        while ticket is None and time.monotonic() < deadline:
            ticket = adm.try_admit("GET /a")
            time.sleep(0.05)
        assert ticket is not None, adm.stats()
        adm.finish(ticket)
        adm.close()
