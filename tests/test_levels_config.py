"""Level and hysteresis arguments: validation and the clear points they produce (no root needed)."""

from __future__ import annotations

import pytest

from rtml_ebpf import Level, Limiter
from rtml_ebpf._rules import Rule, Threshold, Usage, evaluate
from rtml_ebpf.limiter import make_clear
from rtml_ebpf.relief import Relief

MiB = 1 << 20


def test_clear_points() -> None:
    assert make_clear(Threshold(ppm=900_000), 0.05) == Threshold(ppm=850_000)
    assert make_clear(Threshold(nbytes=100 * MiB), 0.1) == Threshold(nbytes=90 * MiB)
    assert make_clear(Threshold(nbytes=100 * MiB), 10 * MiB) == Threshold(nbytes=90 * MiB)
    assert make_clear(Threshold(ppm=900_000), 0.0) == Threshold(ppm=900_000)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"hysteresis": 1.5}, r"hysteresis=1.5: a float margin must be in \[0, 1\)"),
        ({"hysteresis": -1}, r"hysteresis=-1: a margin in bytes must be >= 0"),
        ({"hysteresis": 4096}, r"hysteresis=4096 is bytes but the threshold is a fraction"),
        ({"hysteresis": "x"}, r"hysteresis='x'"),
        ({"soft_threshold": 0.95}, r"soft_threshold=0.95 must be below threshold=0.9"),
        ({"soft_threshold": 2.0}, r"soft_threshold=2.0"),
        ({"relief": "yes"}, r"relief='yes'"),
        ({"on_trip": 3}, r"on_trip=3: pass a callable"),
    ],
)
def test_bad_level_arguments(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Limiter(backend="poll", **kwargs)


def test_hysteresis_rule() -> None:
    rule = Rule("usage", Threshold(nbytes=100), Threshold(nbytes=80))
    at = lambda v: Usage(v, v, None)  # noqa: E731
    assert evaluate(rule, at(100), False) is True
    assert evaluate(rule, at(90), True) is True  # between clear and trip: stays tripped
    assert evaluate(rule, at(90), False) is False  # ... and stays clear
    assert evaluate(rule, at(79), True) is False


def test_levels_on_own_cgroup_with_byte_thresholds() -> None:
    with Limiter(backend="poll", metric="usage", threshold=1 << 50, soft_threshold=4096, relief=False) as lim:
        assert lim.level() is Level.SOFT
        assert not lim.is_mem_limit_reached()
        assert lim.stats().level == "SOFT"
    with Limiter(backend="poll", metric="usage", threshold=8192, soft_threshold=4096, relief=False) as lim:
        assert lim.level() is Level.HARD and lim.pressure() == 1.0 and lim.should_shed()


def test_relief_is_rate_limited() -> None:
    r = Relief(min_interval=60)
    r.run(force=True)
    assert r.stats.runs == 1
    assert r.run() == 0 and r.stats.runs == 1 and r.stats.skipped == 1
    with pytest.raises(ValueError, match="min_interval=-1"):
        Relief(min_interval=-1)
