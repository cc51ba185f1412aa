"""Admission's common case in C (rtml_ebpf/_hot.c, admission/fastpath.py) agrees with the Python it
stands for: the room of a slot (ebpf/words.py room_from_pages), the claim and decision on a real
shared mapping (ledger_fast, rule.decide's first case), and the estimator's window."""

from __future__ import annotations

import math
import mmap
import random

from hypothesis import given, settings
from hypothesis import strategies as st

from rtml_ebpf._hot import Room, Window  # the install builds it (setup.py): a failed build fails here
from rtml_ebpf._rules import Rule, Threshold
from rtml_ebpf.admission import estimator as _estimator
from rtml_ebpf.admission import ledger_fast
from rtml_ebpf.admission.estimator import CostEstimator, _PyWindow
from rtml_ebpf.admission.ledger_layout import FIELDS, H_USED, HEADER, ROWS, SIZE, UPDATED
from rtml_ebpf.ebpf.abi import UNLIMITED_PAGES
from rtml_ebpf.ebpf.words import room_from_pages

PAGE = 4096
pages = st.one_of(st.integers(0, 1 << 40), st.just(UNLIMITED_PAGES), st.integers(UNLIMITED_PAGES, 1 << 50))
# usage, limit, headroom, high, high_room, inactive_delta, inactive_base: word 0..6 of the buffers
WORDS = ["usage", "limit", "headroom", "high", "high_room", "inactive_delta"]


def _room(words: list[int], base: int, metric: str, ppm: int | None, nbytes: int | None) -> Room:
    w = memoryview(bytearray(8 * 8)).cast("q")
    c = memoryview(bytearray(8 * 4)).cast("q")
    for i, v in enumerate(words[:6]):
        w[i] = v
    c[1] = base
    return Room(w, c, 0, 1, 2, 3, 4, 5, 1, metric == "working_set", -1 if ppm is None else ppm,
                -1 if nbytes is None else nbytes, UNLIMITED_PAGES, PAGE)


@settings(max_examples=400, deadline=None)
@given(usage=st.integers(0, 1 << 40), limit=pages, headroom=st.integers(-(1 << 20), 1 << 40), high=pages,
       high_room=st.integers(-(1 << 20), 1 << 40), delta=st.integers(-(1 << 30), 1 << 30),
       base=st.integers(0, 1 << 30), metric=st.sampled_from(["usage", "working_set"]),
       trip=st.one_of(st.tuples(st.integers(0, 1_000_000), st.none()), st.tuples(st.none(), st.integers(0, 1 << 50)),
                      st.tuples(st.none(), st.none())))
def test_room_is_room_from_pages(usage: int, limit: int, headroom: int, high: int, high_room: int, delta: int,
                                 base: int, metric: str, trip: tuple[int | None, int | None]) -> None:
    ppm, nbytes = trip
    rule = Rule(metric, Threshold(ppm=ppm, nbytes=nbytes), Threshold(ppm=ppm, nbytes=nbytes))
    want = room_from_pages(usage, limit, headroom, base + delta, rule, high, high_room)
    assert _room([usage, limit, headroom, high, high_room, delta], base, metric, ppm, nbytes)() == want


def test_room_reads_the_live_words_and_holds_them() -> None:
    mm = mmap.mmap(-1, 4096)
    w = memoryview(mm).cast("q")
    w[0], w[1], w[2], w[3], w[4] = 100, 1000, 900, UNLIMITED_PAGES, UNLIMITED_PAGES
    room = Room(w, w, 0, 1, 2, 3, 4, 5, 6, False, 500_000, -1, UNLIMITED_PAGES, PAGE)
    assert room() == ((500 - 100) * PAGE, 900 * PAGE)
    w[0], w[2] = 600, 400
    assert room() == (-100 * PAGE, 400 * PAGE)
    w[1] = UNLIMITED_PAGES
    assert room() == (None, None)
    try:
        mm.close()
    except BufferError:
        pass  # held, as Verdict holds its byte: a kept reader never reads an unmapped page
    else:
        raise AssertionError("the mapping closed under a live Room")


def _ledger() -> memoryview:
    rows = memoryview(mmap.mmap(-1, SIZE)).cast("q")
    rows[H_USED] = ROWS
    return rows


@settings(max_examples=300, deadline=None)
@given(others=st.lists(st.tuples(st.integers(0, 1 << 34), st.integers(0, 8), st.integers(0, 2),
                                 st.integers(0, 1 << 34), st.integers(0, 1 << 20)), max_size=6),
       own=st.tuples(st.integers(0, 1 << 34), st.integers(0, 8), st.integers(0, 2), st.integers(0, 1 << 34),
                     st.integers(0, 1 << 20)),
       estimate=st.integers(0, 1 << 34), usage=st.integers(0, 1 << 20), limit=st.integers(1, 1 << 21))
def test_fits_claims_then_decides_as_python_does(others: list[tuple[int, int, int, int, int]],
                                                 own: tuple[int, int, int, int, int], estimate: int, usage: int,
                                                 limit: int) -> None:
    c_rows, py_rows = _ledger(), _ledger()
    row = len(others)
    for rows in (c_rows, py_rows):
        for r, values in enumerate(others):
            for i, v in enumerate(values):
                rows[HEADER + r * FIELDS + 2 + i if i < 3 else HEADER + r * FIELDS + 3 + i] = v
    room = _room([usage, limit, max(0, limit - usage), UNLIMITED_PAGES, UNLIMITED_PAGES, 0], 0, "usage", 900_000,
                 None)
    got = room.fits(c_rows, row, own[0], own[1], own[2], own[3], own[4], estimate)
    sums = ledger_fast._claim_py(py_rows, row, own[0] + estimate, own[1] + 1, own[2], own[3], own[4])
    left, limit_room = room()
    assert left is not None
    want = (sums[0], limit_room) if estimate + own[0] + sums[0] <= left else None
    assert got == want
    # the claim: our row as Python writes it (the time aside), every other row untouched
    c_rows[UPDATED + HEADER + row * FIELDS] = py_rows[UPDATED + HEADER + row * FIELDS] = 0
    assert c_rows.tobytes() == py_rows.tobytes()


def test_window_is_the_python_window() -> None:
    rng = random.Random(7)
    for n in (1, 2, 3, 32, 100):
        c, py = Window(n), _PyWindow(n)
        for _ in range(600):
            v = rng.choice([rng.randrange(0, 64), rng.randrange(0, 1 << 40)])
            assert c.add(v) == py.add(v)
            assert len(c) == len(py) and c.ordered == py.ordered
            for q in (0.0, 0.1, 0.5, 0.9, 0.99, 1.0):
                assert c.rank(q) == py.rank(q) == py.ordered[max(1, math.ceil(q * len(py))) - 1]
    big = Window(10**12)  # room for n values is taken as they come, not up front
    assert big.add(5) == 1 and big.rank(0.9) == 5
    assert Window(2).add(1 << 70) == 1  # bytes past int64 are held as its largest value


def test_the_estimator_learns_the_same_with_either_window() -> None:
    rng = random.Random(3)
    samples = [(rng.choice(["GET /a", "POST /b"]), rng.randrange(1, 1 << 28),
                rng.choice([None, rng.randrange(1, 1 << 24)])) for _ in range(400)]
    seen = []
    for window in (Window, _PyWindow):
        _estimator._Window = window  # type: ignore[assignment]
        try:
            est = CostEstimator(window=16, min_samples=3, quantile=0.9)
            trace = []
            for route, cost, size in samples:
                est.observe(route, cost, size)
                trace.append((est.estimate("GET /a"), est.estimate("POST /b", 1 << 20), est.largest(),
                              est.per_kib()))
            seen.append((trace, est.routes()))
        finally:
            _estimator._Window = Window
    assert seen[0] == seen[1]
