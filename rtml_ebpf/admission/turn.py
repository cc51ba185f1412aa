"""A fair turn for a large request: one that fits the cgroup but not the room left now (issue 19, D3).

Under a flood of small requests the room is never free enough at the instant a large one arrives:
40 clients retrying every 50 ms refill it as soon as it opens, so a 72 MiB upload that fits a
256 MiB cgroup alone was served 0-11 times in 80-400 while small ones were served by the hundreds.
So a request refused for the budget whose estimate could fit (below the widest room before the OOM
killer this cgroup has had) takes a *turn*: its estimate is held for ``TURN_TTL_NS``, and every
later admission of a smaller request must leave that much room beside what is reserved (nor may a
smaller one run "alone" over it). As the flood's requests finish, the room the turn holds frees
up, and the large request's retry finds it.

The turn is two words of the shared ledger's header (``ledger_layout.H_TURN``), not reserved
bytes in a row: a claim published as a reservation would also stand in the way of the claimant's
own retry, which may arrive in another worker of a pre-fork server and cannot be told from any
other request. Instead a request at least ``1 / TURN_SHARE`` of the turn's size is not held back
by it (it is the large request, or one of its size: it would use the room the turn saved), and
once admitted it ends the turn. The turn only ever adds refusals, so the rule's properties hold:
nothing is admitted that does not fit, at worst a request is refused. Any process writes the words
without a lock: a race loses or overwrites a turn (less fair for up to ``TURN_TTL_NS``), never more.
Without a shared ledger (``share=False``) the turn is this process's.
"""

from __future__ import annotations

import time
from collections.abc import MutableSequence

from .ledger_layout import H_TURN, H_TURN_UNTIL, HEADER

TURN_TTL_NS = 1_000_000_000  # how long a turn holds room: a few of a client's retries, not more
TURN_SHARE = 2  # a request of at least half the turn's bytes takes the turn rather than waits for it

Words = MutableSequence[int] | memoryview  # a ledger mapping's int64 view, or local_words()


def local_words() -> Words:
    """The turn's words for a process without a shared ledger (the header's layout)."""
    return [0] * HEADER


def held(words: Words, estimate: int, now: int | None = None) -> int:
    """The bytes a waiting larger request holds that a request of ``estimate`` bytes must leave
    free beside the reservations (0: no turn, an expired one, or this request is as large)."""
    turn = words[H_TURN]
    if turn <= 0 or estimate * TURN_SHARE >= turn:
        return 0
    if words[H_TURN_UNTIL] < (time.monotonic_ns() if now is None else now):
        words[H_TURN] = 0  # over: nobody is held back by it any more
        return 0
    return int(turn)


def take(words: Words, estimate: int, now: int | None = None) -> bool:
    """A request of ``estimate`` bytes was refused for the budget although it could fit: it takes
    the turn, unless one is live (the first one waiting keeps it). True when it took it."""
    now = time.monotonic_ns() if now is None else now
    turn = words[H_TURN]
    if turn > 0 and words[H_TURN_UNTIL] >= now:
        # A live turn: the first one waiting keeps it. A request of its size (its own retry, in
        # any worker, or another as large) renews it; a smaller one is what it holds room against.
        if estimate * TURN_SHARE >= turn:
            words[H_TURN_UNTIL] = now + TURN_TTL_NS
        return False
    words[H_TURN_UNTIL] = now + TURN_TTL_NS  # the deadline first: a reader never sees bytes with an old one
    words[H_TURN] = estimate
    return True


def served(words: Words, estimate: int) -> None:
    """A request of ``estimate`` bytes was admitted: if it is the size the turn waits for, the
    turn has come and ends (the next large one refused takes another)."""
    turn = words[H_TURN]
    if turn > 0 and estimate * TURN_SHARE >= turn:
        words[H_TURN] = 0
