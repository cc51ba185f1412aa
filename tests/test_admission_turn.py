"""Issue 19, D3 and D6 without root: the fair turn's arithmetic (it only ever adds refusals; a
request of the turn's size is not held back by it and ends it once admitted; it expires), an ended
request learned as a lower bound (it raises an estimate, never lowers one), and a request on the
cgroup's guess counted as learning in the ledger (one at a time in the cgroup)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from rtml_ebpf import Admission
from rtml_ebpf.admission import decide, turn
from rtml_ebpf.admission.estimator import CostEstimator
from rtml_ebpf.admission.ledger_layout import H_TURN, H_TURN_UNTIL
from rtml_ebpf.admission.sums import own_totals
from rtml_ebpf.admission.ticket import Ticket

MiB = 1 << 20
sizes = st.integers(min_value=0, max_value=1 << 40)
maybe = st.none() | sizes
SECOND = 1_000_000_000


# -- the rule with a turn held -------------------------------------------------------------
@given(est=sizes, reserved=sizes, room=maybe, limit_room=maybe, inflight=st.integers(0, 100),
       held=st.integers(1, 1 << 40), extrapolated=st.booleans())
def test_a_turn_only_adds_refusals(est: int, reserved: int, room: int | None, limit_room: int | None, inflight: int,
                                   held: int, extrapolated: bool) -> None:
    with_turn = decide(est, reserved, room, limit_room, inflight, 0, extrapolated, False, held)
    if with_turn is None:
        assert decide(est, reserved, room, limit_room, inflight, 0, extrapolated) is None
        assert room is None or est + reserved + held <= room  # never "alone" over a held turn


def test_a_small_request_that_fits_now_is_refused_while_a_turn_holds_the_room() -> None:
    assert decide(4 * MiB, 40 * MiB, 48 * MiB, 64 * MiB, 10, 0) is None
    assert decide(4 * MiB, 40 * MiB, 48 * MiB, 64 * MiB, 10, 0, held=24 * MiB) == "budget"
    assert decide(4 * MiB, 0, 48 * MiB, 64 * MiB, 0, 0, held=24 * MiB) is None  # it fits beside the turn


# -- the turn's words ----------------------------------------------------------------------
def test_the_turn_holds_smaller_requests_back_until_its_size_is_served() -> None:
    words = turn.local_words()
    now = 10 * SECOND
    assert turn.held(words, 4 * MiB, now) == 0
    assert turn.take(words, 72 * MiB, now)
    assert turn.held(words, 4 * MiB, now) == 72 * MiB  # a small one must leave it room
    assert turn.held(words, 36 * MiB, now) == 0  # one of its size takes the turn (its retry, any worker)
    assert not turn.take(words, 100 * MiB, now)  # the first one waiting keeps it
    assert words[H_TURN] == 72 * MiB
    turn.served(words, 4 * MiB)
    assert words[H_TURN] == 72 * MiB  # a small one admitted beside it does not end it
    turn.served(words, 72 * MiB, now)
    assert turn.held(words, 4 * MiB, now) == 0
    # Served: the flood has its room back for a while before the next large one takes a turn
    assert not turn.take(words, 72 * MiB, now) and turn.held(words, 4 * MiB, now) == 0
    assert turn.take(words, 72 * MiB, now + turn.TURN_REST_NS + 1)


def test_a_far_larger_request_takes_over_a_small_requests_turn() -> None:
    words = turn.local_words()
    now = 10 * SECOND
    assert turn.take(words, 3 * MiB, now)  # one of the flood, refused, takes a turn
    assert not turn.take(words, 3 * MiB, now + 1)  # its retries renew it...
    assert turn.take(words, 72 * MiB, now + 2)  # ...but a large one is not kept from its turn
    assert turn.held(words, 3 * MiB, now + 2) == 72 * MiB


def test_a_turn_expires_and_its_size_renews_it() -> None:
    words = turn.local_words()
    now = 10 * SECOND
    assert turn.take(words, 72 * MiB, now)
    later = now + turn.TURN_TTL_NS // 2
    assert not turn.take(words, 70 * MiB, later)  # its retry renews it
    assert words[H_TURN_UNTIL] == later + turn.TURN_TTL_NS
    assert not turn.take(words, 4 * MiB, later)  # a smaller one neither takes nor renews it
    assert words[H_TURN_UNTIL] == later + turn.TURN_TTL_NS
    assert turn.held(words, 4 * MiB, later + turn.TURN_TTL_NS) == 72 * MiB
    gone = later + turn.TURN_TTL_NS + 1
    assert turn.held(words, 4 * MiB, gone) == 0 and words[H_TURN] == 0  # expired: cleared by whoever sees it
    assert turn.take(words, 4 * MiB, gone)


# -- an ended request's cost, a lower bound ------------------------------------------------
@given(costs=st.lists(st.integers(0, 1 << 30), min_size=0, max_size=40), ended=st.integers(0, 1 << 30),
       size=st.none() | st.integers(0, 1 << 24))
def test_an_ended_request_never_lowers_an_estimate(costs: list[int], ended: int, size: int | None) -> None:
    est = CostEstimator(window=8)
    for c in costs:
        est.observe("GET /a", c, size)
    before, before_sized, largest = est.estimate("GET /a"), est.estimate("GET /a", size), est.largest()
    est.observe("GET /a", ended, size, floor=True)
    after, after_sized = est.estimate("GET /a"), est.estimate("GET /a", size)
    assert before is None or (after is not None and after >= before)
    assert before_sized is None or (after_sized is not None and after_sized >= before_sized)
    assert est.largest() >= largest


def test_a_route_whose_requests_are_always_ended_is_learned_from_what_they_held() -> None:
    # D6: every request of the heavy route was ended holding 44 MiB on a 9.7 MiB guess.
    adm = Admission(enforce=False, follow_threads=False, release_heap=False, share=False)
    for held in (44 * MiB, 40 * MiB, 50 * MiB):
        t = Ticket("GET /overrun", 9_700_000, 0, 0, True, basis="cgroup")
        t.peak, t.ended = held, True
        assert adm.finish(t) == held
    assert adm.estimator.estimate("GET /overrun") == 50 * MiB
    t = Ticket("GET /overrun", 50 * MiB, 0, 0, True)
    t.peak, t.ended = 8 * MiB, True  # ended early, below its estimate: says nothing
    adm.finish(t)
    assert adm.estimator.estimate("GET /overrun") == 50 * MiB
    assert [r.samples for r in adm.estimator.routes() if r.route == "GET /overrun"] == [3]


# -- a guess runs as learning --------------------------------------------------------------
def test_a_request_on_the_cgroups_guess_counts_as_learning() -> None:
    guessed = Ticket("GET /b", 8 * MiB, 0, 0, True, basis="cgroup")
    learned = Ticket("GET /a", 8 * MiB, 0, 0, True, basis="route")
    learning = Ticket("GET /c", None, 0, 0, True, basis="learning")
    assert own_totals([guessed, learned, learning]) == (16 * MiB, 3, 2)
    # A sized guess is scaled by the cgroup's cost per KiB: one per route per process, not learning
    sized = Ticket("POST /up", 72 * MiB, 0, 0, True, size=2304 << 10, basis="cgroup")
    assert own_totals([sized]) == (72 * MiB, 1, 0)
