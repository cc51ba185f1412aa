"""Costs that see the request: size classes, interpolation, extrapolation, declared per-byte costs,
and the admission rule for a guess beyond every measured size."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rtml_ebpf import ConfigError
from rtml_ebpf.admission import decide
from rtml_ebpf.admission.estimator import SIZE_FLOOR, CostEstimator, size_class

MiB = 1 << 20
KiB = 1 << 10


def learned(pairs: list[tuple[int, int | None]], **kw: object) -> CostEstimator:
    est = CostEstimator(min_samples=3, **kw)  # type: ignore[arg-type]
    for cost, size in pairs:
        est.observe("POST /up", cost, size)
    return est


def test_a_heavy_tail_route_is_estimated_by_size_not_by_its_quantile() -> None:
    # The shape: 92% of bodies 64 KiB (2 MiB decoded), 8% 1.5 MiB (48 MiB decoded).
    pairs = [(48 * MiB, 1536 * KiB)] * 3 + [(2 * MiB, 64 * KiB)] * 30  # the window keeps 2 of the tail
    est = learned(pairs)
    assert est.estimate("POST /up") == 2 * MiB  # the route's 90th percentile misses the tail...
    assert est.estimate("POST /up", 1536 * KiB) == 48 * MiB  # ...its size class does not
    assert est.estimate("POST /up", 64 * KiB) == 2 * MiB


def test_an_unseen_larger_size_is_extrapolated_in_proportion_and_marked() -> None:
    est = learned([(2 * MiB, 64 * KiB)] * 3)
    e = est.estimate_for("POST /up", 1536 * KiB)
    assert e is not None and e.extrapolated
    assert e.bytes == pytest.approx(48 * MiB, rel=0.01)  # 24x the body, 24x the cost: the cautious guess


def test_two_learned_sizes_give_a_slope_so_a_fixed_cost_route_is_not_overestimated() -> None:
    est = learned([(24 * MiB, 8 * KiB)] * 3 + [(24 * MiB, MiB)] * 3)
    e = est.estimate_for("POST /up", 8 * MiB)
    assert e is not None and e.extrapolated and e.bytes == 24 * MiB  # flat: the cost does not grow
    between = est.estimate_for("POST /up", 100 * KiB)
    assert between is not None and between.basis == "interpolated" and between.bytes == 24 * MiB


def test_interpolation_stays_between_the_neighbours() -> None:
    est = learned([(2 * MiB, 64 * KiB)] * 3 + [(48 * MiB, 1536 * KiB)] * 3)
    e = est.estimate_for("POST /up", 512 * KiB)
    assert e is not None and e.basis == "interpolated" and 2 * MiB < e.bytes < 48 * MiB
    smaller = est.estimate_for("POST /up", 16 * KiB)  # below every learned class: at most the next one
    assert smaller is not None and smaller.bytes == 2 * MiB


def test_small_and_unknown_sizes_use_the_route_estimate() -> None:
    est = learned([(5 * MiB, None)] * 3)
    assert est.estimate("POST /up", SIZE_FLOOR - 1) == 5 * MiB
    assert est.estimate("POST /up", None) == 5 * MiB
    assert size_class(None) == size_class(0) == size_class(SIZE_FLOOR - 1) == 0
    assert size_class(SIZE_FLOOR) > 0


def test_declared_costs_per_byte_and_functions() -> None:
    per_byte = CostEstimator(cost_per_byte=32)
    assert per_byte.estimate("POST /up", 64 * KiB) == 2 * MiB
    assert per_byte.estimate("POST /up") is None  # no size: learn
    by_route = CostEstimator(cost_per_byte={"POST /up": 2.5}, route_costs={"POST /up": MiB})
    assert by_route.estimate("POST /up", 4 * MiB) == MiB + 10 * MiB  # base plus per byte
    fn = CostEstimator(cost=lambda route, size: None if size is None else 3 * size)
    assert fn.estimate("POST /x", MiB) == 3 * MiB
    assert fn.estimate("POST /x") is None


@pytest.mark.parametrize("kw", [{"cost_per_byte": -1}, {"cost_per_byte": math.nan}, {"cost_per_byte": "32"},
                                {"cost_per_byte": {"POST /up": math.inf}}, {"cost_per_byte": True},
                                {"cost": 5}])
def test_bad_declarations_are_config_errors(kw: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        CostEstimator(**kw)  # type: ignore[arg-type]


def test_a_guess_beyond_every_measured_size_runs_alone_rather_than_never() -> None:
    # 3 GiB guessed for a cgroup with 200 MiB left: refused beside others, admitted alone.
    assert decide(3 << 30, 10 * MiB, 150 * MiB, 200 * MiB, 2, 0, extrapolated=True) == "budget"
    assert decide(3 << 30, 0, 150 * MiB, 200 * MiB, 0, 0, extrapolated=True) is None
    assert decide(3 << 30, 0, 150 * MiB, 200 * MiB, 0, 0, extrapolated=False) == "budget"


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 1 << 34), st.one_of(st.none(), st.integers(0, 1 << 36))), max_size=80),
       st.one_of(st.none(), st.integers(0, 1 << 40)))
def test_estimates_are_never_negative_and_never_raise(samples: list[tuple[int, int | None]],
                                                      size: int | None) -> None:
    est = CostEstimator(min_samples=2, window=8)
    for cost, s in samples:
        est.observe("R", cost, s)
    e = est.estimate_for("R", size)
    assert e is None or e.bytes >= 0
    assert est.largest() >= 0
