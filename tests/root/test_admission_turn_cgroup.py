"""Issue 19 on a real cgroup and a real shared ledger: a large request that fits the cgroup but not
the room left now gets its turn under a flood of small ones (D3), in whichever worker its retry
lands, and requests on the cgroup's guess run one at a time in the cgroup, not one per worker (D6).

The flood is played step by step so the order is the one that starved large requests: each time
a small request finishes, a small one retries before the large one does."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.cgroups import MiB, make_cgroup, needs_bpf, needs_cgroups

from rtml_ebpf import Admission, Limiter
from rtml_ebpf.admission.ledger_layout import H_TURN
from rtml_ebpf.admission.ticket import Ticket

pytestmark = [pytest.mark.root, needs_cgroups, needs_bpf]
COSTS = {"GET /small": 4 * MiB, "GET /big": 24 * MiB}


@pytest.fixture
def ledger_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    where = tmp_path / "ledgers"
    where.mkdir(mode=0o700)
    monkeypatch.setenv("RTML_LEDGER_DIR", str(where))
    yield str(where)


def _fill(adm: Admission, route: str) -> list[Ticket]:
    held = []
    while len(held) < 64:
        t = adm.try_admit(route)
        if t is None:
            break
        held.append(t)
    assert adm.refusal() == "budget" and len(held) >= 8, (adm.refusal(), len(held))
    return held


def _turn(adm: Admission) -> int:
    ledger = adm._shared.ledger
    assert ledger is not None and ledger._rows is not None
    return int(ledger._rows[H_TURN])


def test_a_large_request_gets_its_turn_under_a_flood_of_small_ones(ledger_dir: str) -> None:
    with make_cgroup(limit=64 * MiB) as cg:
        lim = Limiter(cg.directory, backend="ebpf", metric="usage", threshold=0.75, relief=False)
        try:
            adm = Admission(lim, route_costs=COSTS, enforce=False, release_heap=False)
            small = _fill(adm, "GET /small")
            assert adm.try_admit("GET /big") is None and adm.refusal() == "budget"
            assert _turn(adm) == COSTS["GET /big"]  # it could fit: it holds a turn
            big = None
            small_refused = 0
            for _ in range(len(small)):
                adm.finish(small.pop(0))
                t = adm.try_admit("GET /small")  # the flood retries first...
                if t is None:
                    assert adm.refusal() == "budget"
                    small_refused += 1
                else:
                    small.append(t)
                big = adm.try_admit("GET /big")  # ...then the large one
                if big is not None:
                    break
            # Without the turn each freed 4 MiB went to the next small request and the large one
            # was refused for ever; with it, it is admitted once 24 MiB are free.
            assert big is not None, "the large request never got its turn"
            assert small_refused >= 1
            assert _turn(adm) <= 0  # served: the turn is over
            adm.finish(small.pop(0))
            t = adm.try_admit("GET /small")  # and small ones are admitted again where they fit
            assert t is not None, adm.refusal()
            for t2 in [t, big, *small]:
                adm.finish(t2)
        finally:
            lim.close()


def test_the_turn_does_not_hold_back_the_large_requests_retry_in_another_worker(ledger_dir: str) -> None:
    with make_cgroup(limit=64 * MiB) as cg:
        lim = Limiter(cg.directory, backend="ebpf", metric="usage", threshold=0.75, relief=False)
        try:
            adm = Admission(lim, route_costs=COSTS, enforce=False, release_heap=False)
            small = _fill(adm, "GET /small")
            assert adm.try_admit("GET /big") is None and _turn(adm) == COSTS["GET /big"]
            for _ in range(6):  # 24 MiB free, held by the turn
                adm.finish(small.pop(0))
            assert adm.try_admit("GET /small") is None  # the turn holds them
            asked, told = os.pipe()
            go_r, go_w = os.pipe()
            pid = os.fork()
            if pid == 0:  # another worker of the same cgroup: the large request's retry lands here
                code = 1
                try:
                    t = adm.try_admit("GET /big")
                    os.write(told, b"1" if t is not None else (adm.refusal() or "?").encode())
                    os.read(go_r, 1)
                    if t is not None:
                        adm.finish(t)
                    code = 0
                finally:
                    os._exit(code)
            try:
                answer = os.read(asked, 64)
                assert answer == b"1", f"the retry in another worker was refused: {answer!r}"
                assert _turn(adm) <= 0  # its turn came, in the other process
                # The other worker's 24 MiB are reserved now: a small request still does not fit
                assert adm.try_admit("GET /small") is None and adm.refusal() == "budget"
            finally:
                os.write(go_w, b"x")
                _, status = os.waitpid(pid, 0)
            assert os.waitstatus_to_exitcode(status) == 0
            for t in small:
                adm.finish(t)
        finally:
            lim.close()


def test_requests_on_the_cgroups_guess_run_one_at_a_time_across_workers(ledger_dir: str) -> None:
    # D6: a route learned by one worker is guessed at by the others at the largest figure the cgroup
    # knows; 4 workers each ran one 100 MiB request on a 9.7 MiB guess.
    with make_cgroup(limit=256 * MiB) as cg:
        lim = Limiter(cg.directory, backend="ebpf", metric="usage", threshold=0.8, relief=False)
        try:
            adm = Admission(lim, enforce=False, release_heap=False)
            for _ in range(3):
                adm.estimator.observe("GET /work", 8 * MiB)
            first = adm.try_admit("GET /work")
            assert first is not None and first.basis == "route"
            adm.finish(first)
            asked, told = os.pipe()
            go_r, go_w = os.pipe()
            pids = []
            for _ in range(2):  # two fresh workers: they have learned nothing
                pid = os.fork()
                if pid == 0:
                    code = 1
                    try:
                        adm.estimator._estimates.clear()
                        adm.estimator._learned.clear()
                        adm.estimator._routes.clear()
                        t = adm.try_admit("GET /overrun")
                        os.write(told, b"Y" if t is not None else b"N")
                        os.read(go_r, 1)
                        if t is not None:
                            assert t.basis == "cgroup" and t.estimate == 8 * MiB
                            adm.finish(t)
                        code = 0
                    finally:
                        os._exit(code)
                pids.append(pid)
            try:
                answers = os.read(asked, 1) + os.read(asked, 1)
            finally:
                os.write(go_w, b"xx")
                for pid in pids:
                    _, status = os.waitpid(pid, 0)
                    assert os.waitstatus_to_exitcode(status) == 0
            assert sorted(answers) == sorted(b"YN"), answers  # one guess at a time in the cgroup
        finally:
            lim.close()
