"""Budget admission without root: the rule's arithmetic, the estimator, the shared ledger
across real processes (one of them SIGKILLed), and asyncio step attribution."""

from __future__ import annotations

import asyncio
import os
import signal
import stat
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rtml_ebpf import Admission, ConfigError, Limiter
from rtml_ebpf.admission import Ticket, decide
from rtml_ebpf.admission.estimator import OVERFLOW_ROUTE, CostEstimator, quantile, route_key
from rtml_ebpf.admission.ledger import REAP_INTERVAL, Ledger
from rtml_ebpf.backends.meter import RUSAGE

MiB = 1 << 20
sizes = st.integers(min_value=0, max_value=1 << 40)
maybe = st.none() | sizes


# -- the rule -----------------------------------------------------------------------------
@given(est=sizes, reserved=sizes, room=sizes, limit_room=maybe, inflight=st.integers(1, 1000),
       learning=st.integers(0, 10))
def test_admitted_with_company_means_it_fits(est: int, reserved: int, room: int, limit_room: int | None,
                                              inflight: int, learning: int) -> None:
    # Safety: with anything else in flight, a request is admitted only if it fits the budget.
    if decide(est, reserved, room, limit_room, inflight, learning) is None:
        assert est + reserved <= room


@given(est=sizes, reserved=sizes, less=sizes, room=maybe, limit_room=maybe, inflight=st.integers(0, 100))
def test_less_reserved_never_turns_a_yes_into_a_no(est: int, reserved: int, less: int, room: int | None,
                                                    limit_room: int | None, inflight: int) -> None:
    smaller = max(0, reserved - less)
    if decide(est, reserved, room, limit_room, inflight, 0) is None:
        assert decide(est, smaller, room, limit_room, inflight, 0) is None


@given(est=sizes, reserved=sizes, room=maybe, limit_room=maybe)
def test_alone_and_below_the_limit_always_runs(est: int, reserved: int, room: int | None,
                                               limit_room: int | None) -> None:
    if limit_room is None or est < limit_room:
        assert decide(est, reserved, room, limit_room, 0, 0) is None


@given(learning=st.integers(0, 5), inflight=st.integers(0, 50))
def test_learning_routes_run_one_at_a_time(learning: int, inflight: int) -> None:
    assert (decide(None, 0, 0, 0, inflight, learning) is None) == (learning == 0)


def test_no_limit_admits() -> None:
    assert decide(1 << 40, 1 << 40, None, None, 10, 0) is None


# -- the estimator ------------------------------------------------------------------------
@given(values=st.lists(st.integers(0, 1 << 32), min_size=1, max_size=64), q=st.floats(0.01, 1.0))
def test_quantile_is_a_sample_with_enough_below(values: list[int], q: float) -> None:
    v = quantile(values, q)
    assert v in values
    assert sum(x <= v for x in values) >= q * len(values) - 1e-9
    assert sum(x < v for x in values) < q * len(values) + 1e-9


@settings(max_examples=50)
@given(costs=st.lists(st.integers(0, 1 << 30), min_size=1, max_size=100))
def test_estimate_follows_the_window(costs: list[int]) -> None:
    est = CostEstimator(window=16, min_samples=3, quantile=0.9)
    for i, c in enumerate(costs):
        est.observe("GET /x", c)
        got = est.estimate("GET /x")
        if i + 1 < 3:
            assert got is None  # learning
        else:
            window = costs[max(0, i + 1 - 16) : i + 1]
            assert got == quantile(window, 0.9)


def test_declared_costs_override_learning_and_tables_stay_bounded() -> None:
    est = CostEstimator(route_costs={"POST /up": 64 * MiB}, max_routes=4, min_samples=1)
    assert est.estimate("POST /up") == 64 * MiB
    assert CostEstimator(request_bytes=MiB).estimate("GET /anything") == MiB
    for i in range(100):
        est.observe(f"GET /r{i}", i)
    learned = [r.route for r in est.routes() if not r.declared]
    assert len(learned) <= 4 + 1 and OVERFLOW_ROUTE in learned


def test_route_keys_fold_ids() -> None:
    assert route_key("GET", "/users/42/items?page=2") == "GET /users/:id/items"
    assert route_key("GET", "/o/0f8fad5b-d9cb-469f-a165-70867728950e") == "GET /o/:id"
    assert route_key("POST", "/upload") == "POST /upload"


@pytest.mark.parametrize("kwargs", [{"request_bytes": -1}, {"request_bytes": True}, {"quantile": 0},
                                    {"window": 0}, {"min_samples": 40, "window": 8},
                                    {"route_costs": {"GET /": "big"}}, {"share": "yes"}])
def test_bad_settings_are_config_errors(kwargs: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        Admission(**kwargs)  # type: ignore[arg-type]


# -- the ledger, across real processes --------------------------------------------------------
def test_ledger_is_shared_and_a_killed_process_leaves_nothing(tmp_path: Path) -> None:
    cgid = 4242
    mine = Ledger(cgid, str(tmp_path))
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # a worker that reserves 64 MiB for a request, then is SIGKILLed mid-request
        try:
            child = Ledger(cgid, str(tmp_path))
            child.lock()
            child.publish(64 * MiB, 1, 0)
            child.unlock()
            os.write(w, b"x")
            time.sleep(60)
        finally:
            os._exit(0)
    os.read(r, 1)
    mine.lock()
    try:
        assert mine.totals() == (64 * MiB, 1, 0, 0)  # the other worker's reservation counts here
    finally:
        mine.unlock()
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    time.sleep(REAP_INTERVAL + 0.1)
    mine.lock()
    try:
        assert mine.totals() == (0, 0, 0, 0)  # reaped: the killed worker leaked nothing
    finally:
        mine.unlock()
    mode = os.stat(mine.path).st_mode
    assert stat.S_IMODE(mode) == 0o600
    mine.close()


def test_ledger_refuses_a_file_planted_by_another_user(tmp_path: Path) -> None:
    path = tmp_path / "77.ledger"
    path.write_bytes(b"")
    os.chmod(path, 0o666)
    ledger = Ledger(77, str(tmp_path))
    with pytest.raises(ConfigError, match="private regular file"):
        ledger.lock()


# -- admission end to end, on a real (poll) limiter of this process's cgroup ----------------
def test_declared_costs_fill_the_budget_then_shed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RTML_LEDGER_DIR", str(tmp_path))
    probe = Limiter(backend="poll", metric="usage", relief=False)
    usage = probe.stats().usage_bytes
    probe.close()
    with Limiter(backend="poll", threshold=usage + 100 * MiB, metric="usage", relief=False,
                 poll_interval=0) as lim:
        adm = Admission(lim, request_bytes=30 * MiB)
        tickets = [adm.try_admit("GET /a") for _ in range(5)]
        admitted = [t for t in tickets if t is not None]
        # ~100 MiB of room and 30 MiB each: three fit, the fourth would cross the threshold
        assert len(admitted) == 3, adm.stats()
        assert adm.stats().rejected_budget == 2
        for t in admitted:
            adm.finish(t)
        assert adm.try_admit("GET /a") is not None  # released: room again
        adm.close()


def test_asyncio_steps_charge_each_request_its_own_memory(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RTML_LEDGER_DIR", str(tmp_path))
    sizes_mib = {"small": 8, "big": 40}
    held: list[bytearray] = []

    async def handler(n_mib: int) -> None:
        for _ in range(n_mib):
            buf = bytearray(MiB)
            buf[::4096] = b"\x01" * (MiB // 4096)
            held.append(buf)
            await asyncio.sleep(0)  # interleave with the other request on the same thread

    async def main(adm: Admission) -> dict[str, Ticket]:
        tickets = {k: adm.try_admit(k, stepped=True) for k in sizes_mib}
        assert all(t is not None for t in tickets.values())
        await asyncio.gather(*(adm.run_async(t, handler(sizes_mib[k]))  # type: ignore[arg-type]
                               for k, t in tickets.items()))
        return tickets  # type: ignore[return-value]

    with Limiter(backend="poll", relief=False) as lim:
        adm = Admission(lim, request_bytes=MiB)
        assert adm._meter(lim) is RUSAGE  # the poll backend measures by the thread's faults
        tickets = asyncio.run(main(adm))
        for name, t in tickets.items():
            want = sizes_mib[name] * MiB
            assert abs(t.peak - want) <= 0.1 * want, (name, t.peak, want)
        adm.close()


@settings(max_examples=100)
@given(samples=st.lists(st.tuples(st.sampled_from(["GET /a", "GET /b", "POST /c"]), st.integers(0, 1 << 30)),
                        min_size=1, max_size=120), declared=st.integers(0, 1 << 30))
def test_largest_is_the_largest_estimate_after_every_sample(samples: list[tuple[str, int]], declared: int) -> None:
    est = CostEstimator(window=8, min_samples=2, route_costs={"PUT /d": declared})
    for route, cost in samples:
        est.observe(route, cost)
        known = [e for e in (est.estimate(r) for r in ("GET /a", "GET /b", "POST /c")) if e is not None]
        assert est.largest() == max([declared, *known])
