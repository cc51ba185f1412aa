"""The admission rule, as arithmetic: pure, so it is tested and reasoned about on its own
(tests/test_admission.py checks it by property)."""

from __future__ import annotations


def decide(
    estimate: int | None,
    reserved: int,
    room: int | None,
    limit_room: int | None,
    inflight: int,
    learning: int,
    extrapolated: bool = False,
    never: bool = False,
    held: int = 0,
) -> str | None:
    """The admission rule, as arithmetic: None to admit, else why not ("learning", "budget").

    ``estimate``: bytes the request is expected to reach (None while its route learns);
    ``reserved``: reservations not yet charged, every process of the cgroup; ``room``: bytes
    before the threshold by the metric (None: no limit); ``limit_room``: bytes before the OOM
    killer acts; ``inflight``/``learning``: requests in flight / learning, every process;
    ``extrapolated``: the estimate is a guess beyond every size measured (see _estimator);
    ``never``: the estimate (of a declared body size) is far beyond any room this cgroup has had:
    refused as "too_large" rather than let through alone, where it would shut out every other
    request for as long as it runs (a header declaring 200 MiB); ``held``: bytes a larger request
    refused earlier holds for its turn (admission/turn.py): this one must leave them free, and does
    not run alone over them.
    """
    if estimate is None:
        return None if learning == 0 else "learning"
    if room is None or estimate + reserved + held <= room:
        return None
    if never:
        return "too_large"
    if inflight == 0 and held == 0 and (extrapolated or limit_room is None or estimate < limit_room):
        # Alone it fits below the limit: let one through so the service progresses. A guess
        # runs alone too, so it is measured instead of refused for ever (the enforcer ends it
        # if it really does not fit).
        return None
    return "budget"


NEVER_FACTOR = 2  # an estimate this many times the widest room ever seen can never fit


def never_fits(estimate: int | None, widest_room: int) -> bool:
    """A sized request's estimate is so far beyond the widest room before the OOM killer this
    cgroup has had that it cannot run even alone (the factor leaves room for an estimate that
    extrapolates too far)."""
    return estimate is not None and widest_room > 0 and estimate > NEVER_FACTOR * widest_room
