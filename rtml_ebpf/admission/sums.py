"""The arithmetic around admission's decision: this process's totals, the guess for a route not
learned here, and the constructor's flags checked."""

from __future__ import annotations

from collections.abc import Iterable

from ..errors import ConfigError
from ..limiter import Limiter
from .estimator import SIZE_FLOOR, CostEstimator
from .ticket import Ticket


def validate(limiter: object, **flags: object) -> None:
    if limiter is not None and not isinstance(limiter, Limiter):
        raise ConfigError(f"limiter={limiter!r}: pass a rtml_ebpf.Limiter, or None for the process default")
    for name, flag in flags.items():
        if not isinstance(flag, bool):
            raise ConfigError(f"{name}={flag!r}: pass True or False")


def cgroup_guess(estimator: CostEstimator, size: int | None, per_kib: int, largest: int) -> int | None:
    """What to reserve for a route this process has not learned: the largest estimate the cgroup
    knows, or more for a sized request where processes learned how cost grows with the body."""
    scaled = estimator.scaled(size, max(estimator.per_kib(), per_kib))
    if scaled is not None and scaled.bytes > largest:
        return scaled.bytes
    return largest if largest > 0 else None


def blind(size: int | None) -> bool:
    """A guess for a request of this body size is another route's figure, not one scaled by the
    cgroup's cost per KiB of body (a sized guess: kept one per route per process, since making
    each fresh worker's first uploads wait for each other cost a flood most of its throughput)."""
    return size is None or size < SIZE_FLOOR


def own_totals(tickets: Iterable[Ticket]) -> tuple[int, int, int]:
    """(reserved not yet charged, in flight, learning) of these requests. A request admitted on the
    cgroup's guess (basis "cgroup") without a body size counts as learning too: its route's cost
    is unknown here and its figure is another route's, so it runs one at a time in the cgroup like
    a learning one (issue 19, D6: 4 workers each ran a 100 MiB request on a 9.7 MiB guess)."""
    reserved = learning = inflight = 0
    for t in tickets:
        if t.pending:
            continue  # waiting for its body: no slot, no reservation
        inflight += 1
        if t.estimate is None:
            learning += 1
            continue
        if t.basis == "cgroup" and blind(t.size):
            learning += 1
        reserved += max(0, t.estimate - max(0, t.grown()))
    return reserved, inflight, learning
