"""The growth-rate estimator (rtml_ebpf/_growth.py) on synthetic readings."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from rtml_ebpf._growth import Growth, seconds_to

MiB = 1 << 20
MS = 1_000_000


def test_a_steady_rate_through_64_page_steps_is_found() -> None:
    g = Growth()
    batch = 64 * 4096  # the page counter moves in per-CPU batches
    for i in range(40):  # 50 MiB/s for 2 s, read every 50 ms, quantized to the batch
        t = i * 50 * MS
        g.add(t, (50 * MiB * t // 1_000_000_000) // batch * batch)
    rate = g.rate(39 * 50 * MS)
    assert rate is not None and abs(rate - 50 * MiB) / (50 * MiB) < 0.05


def test_no_rate_without_enough_recent_readings() -> None:
    g = Growth()
    g.add(0, 0)
    g.add(100 * MS, MiB)
    assert g.rate(100 * MS) is None  # two readings
    for i in range(3, 20):
        g.add(i * 100 * MS, i * MiB)
    assert g.rate(10_000 * MS) is None  # all of them stale


def test_close_readings_are_skipped() -> None:
    g = Growth()
    for i in range(100):
        g.add(i * MS, i)  # every 1 ms: only one per 40 ms is kept
    assert len(g._samples) <= 3


@given(st.integers(min_value=-10**9, max_value=10**9), st.integers(min_value=0, max_value=10**12))
def test_the_slope_of_a_line_is_its_rate(rate: int, base: int) -> None:
    g = Growth()
    for i in range(21):
        t = i * 50 * MS
        g.add(t, base + rate * t // 1_000_000_000)
    got = g.rate(20 * 50 * MS)
    assert got is not None and abs(got - rate) <= max(2.0, abs(rate) * 1e-6) * 20


def test_time_to_limit() -> None:
    assert seconds_to(100 * MiB, 50.0 * MiB) == 2.0
    assert seconds_to(100 * MiB, 0.0) is None  # not growing
    assert seconds_to(100 * MiB, -5.0 * MiB) is None  # shrinking
    assert seconds_to(None, 50.0 * MiB) is None  # unlimited
    assert seconds_to(-MiB, 50.0 * MiB) == 0.0  # past it already
