"""Admission's common case on its few-step path (rtml_ebpf/admission/fastpath.py) on a real cgroup:
the pre-built room reads what Limiter.room() reads; the fast path admits and refuses exactly as
the step-by-step path does (the same number of requests in flight fit, the refusal's reason and
its claim given back); and it stops reading the slot once the limiter is closed or its cgroup gone."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.cgroups import MiB, make_cgroup, needs_bpf, needs_cgroups, wait_until

from rtml_ebpf import Admission, Limiter
from rtml_ebpf.admission.ledger import read_totals
from rtml_ebpf.admission.ticket import Ticket

pytestmark = [pytest.mark.root, needs_cgroups, needs_bpf]
COST = 4 * MiB


@pytest.fixture
def ledger_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    where = tmp_path / "ledgers"
    where.mkdir(mode=0o700)
    monkeypatch.setenv("RTML_LEDGER_DIR", str(where))
    yield str(where)


@pytest.mark.parametrize("metric,threshold", [("usage", 0.5), ("working_set", 0.75), ("usage", 20 * MiB)])
def test_the_room_reader_reads_what_room_reads(metric: str, threshold: float | int) -> None:
    with make_cgroup(limit=64 * MiB) as cg:
        lim = Limiter(cg.directory, backend="ebpf", metric=metric, threshold=threshold, relief=False)
        try:
            reader = lim.room_reader()
            assert reader is not None and reader.check is lim.is_mem_limit_reached
            holder = cg.hold()
            for mib in (0, 8, 16):
                holder.change(mib)
                assert wait_until(lambda: reader.room() == lim.room(), timeout=2), (reader.room(), lim.room())
                assert lim.room()[0] is not None and lim.room()[1] is not None
        finally:
            lim.close()


def _fill(adm: Admission) -> tuple[list[Ticket], str | None]:
    """Admit until refused: the tickets in flight, and why the next one was refused."""
    held = []
    while len(held) < 64:
        t = adm.try_admit("GET /x")
        if t is None:
            return held, adm.refusal()
        held.append(t)
    return held, None


def _admission(lim: Limiter, fast: bool, cost: int = COST) -> tuple[Admission, list[int]]:
    adm = Admission(lim, request_bytes=cost, enforce=False)
    slow_calls = [0]
    slow = adm._admit_slow

    def counted(*args: object) -> Ticket | None:
        slow_calls[0] += 1
        return slow(*args)  # type: ignore[arg-type]

    adm._admit_slow = counted  # type: ignore[method-assign]
    if not fast:
        adm._prepare = lambda lim: None  # type: ignore[method-assign]
    return adm, slow_calls


def test_the_fast_path_admits_and_refuses_as_the_full_path_does(ledger_dir: str) -> None:
    with make_cgroup(limit=64 * MiB) as cg:
        lim = Limiter(cg.directory, backend="ebpf", metric="usage", threshold=0.5, relief=False)
        holder = cg.hold()
        try:
            for grown in (0, 12):  # the room shrinks: fewer requests fit, on both paths alike
                holder.change(grown)
                assert wait_until(lambda: lim.room_reader() is not None and lim.room()[0] is not None)
                # 5 fit with 0.7 of a request's cost to spare: a decision off by half an estimate shows
                cost = int(lim.room()[0] / 5.7)  # type: ignore[operator]
                seen = {}
                for fast in (True, False):
                    adm, slow_calls = _admission(lim, fast, cost)
                    adm.finish(adm.try_admit("GET /x"))  # the first one, on the full path, prepares the fast one
                    assert (adm._fast is not None) is fast
                    slow_calls[0] = 0
                    held, why = _fill(adm)
                    # the fast path admitted every one of these; the refusal is the full path's to say
                    assert slow_calls[0] == (1 if fast else len(held) + 1)
                    totals = read_totals(lim.cgroup_id, ledger_dir)
                    assert totals is not None and totals.reserved == len(held) * cost  # the refusal gave its claim back
                    seen[fast] = (len(held), why, adm.stats().rejected_budget)
                    for t in held:
                        adm.finish(t)
                    adm.close()
                assert seen[True] == seen[False] and seen[True][1] == "budget", seen
                assert seen[True][0] == 5
        finally:
            lim.close()


@pytest.mark.parametrize("how", ["close", "gone"])
def test_the_fast_path_is_dropped_when_the_limiter_closes_or_its_cgroup_is_gone(ledger_dir: str, how: str) -> None:
    with make_cgroup(limit=64 * MiB) as cg:
        # on_trip: the monitor looks at this limiter, so its limit check finds the cgroup gone
        lim = Limiter(cg.directory, backend="ebpf", metric="usage", threshold=0.5, relief=False,
                      on_trip=lambda s: None)
        adm = Admission(lim, request_bytes=COST, enforce=False)
        adm.finish(adm.try_admit("GET /x"))
        assert adm._fast is not None
        if how == "close":
            lim.close()
        else:
            os.rmdir(cg.directory)
            assert wait_until(lambda: lim._backend.gone is not None, timeout=5)
        assert lim.room() == (None, None)  # fail open: what the full path answers from now on
        t = adm.try_admit("GET /x")
        assert t is not None and adm._fast is None and lim.room_reader() is None
        adm.finish(t)
        assert adm._fast is None
        adm.close()
        lim.close()


def test_the_fast_path_follows_a_relinked_ledger(ledger_dir: str, caplog: pytest.LogCaptureFixture) -> None:
    """``rm`` of the ledger file: the publisher thread joins a new one (under the admission lock)
    and the fast path, which looks at the ledger under that lock, goes on with the new mapping."""
    caplog.set_level(logging.INFO, logger="rtml_ebpf")
    with make_cgroup(limit=64 * MiB) as cg:
        lim = Limiter(cg.directory, backend="ebpf", metric="usage", threshold=0.5, relief=False)
        adm = Admission(lim, request_bytes=COST, enforce=False)
        held = adm.try_admit("GET /held")  # in flight throughout: the publisher looks every 5 ms
        assert held is not None
        adm.finish(adm.try_admit("GET /x"))
        fast = adm._fast
        assert fast is not None
        old = fast.rows
        os.unlink(fast.ledger.path)
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline and (adm._fast is None or adm._fast.rows is old):
            t = adm.try_admit("GET /x")
            assert t is not None
            adm.finish(t)
        assert adm._fast is not None and adm._fast.rows is not old, "the fast path kept the deleted ledger"
        assert os.path.exists(adm._fast.ledger.path)
        # the held request, in the new file (the last finish is re-published within PUBLISH_INTERVAL)
        assert wait_until(lambda: getattr(read_totals(lim.cgroup_id, ledger_dir), "inflight", None) == 1)
        assert "admission failed" not in caplog.text
        adm.finish(held)
        adm.close()
        lim.close()
