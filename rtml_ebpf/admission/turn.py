"""A fair turn for a large request: one that fits the cgroup but not the room left now (issue 19, D3).

Under a flood of small requests the room is never free enough at the instant a large one arrives:
40 clients retrying every 50 ms refill it as soon as it opens, so a 72 MiB upload that fits a
256 MiB cgroup alone was served 0-11 times in 80-400 while small ones were served by the hundreds.
So a request refused for the budget whose estimate could fit (below the widest room before the OOM
killer this cgroup has had) takes a *turn*: its estimate is held for ``TURN_TTL_NS``, and every
later admission of a smaller request must leave that much room beside what is reserved (nor may a
smaller one run "alone" over it). As the flood's requests finish, the room the turn holds frees
up, and the large request's retry finds it. Once it is served, no turn is taken for
``TURN_REST_NS``, so the flood is held back for at most one large request at a time.

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
TURN_REST_NS = 2_000_000_000  # after a turn is served, none is taken for this long (see served())
TURN_SHARE = 2  # a request of at least half the turn's bytes takes the turn rather than waits for it

Words = MutableSequence[int] | memoryview  # a ledger mapping's int64 view, or local_words()


def local_words() -> Words:
    """The turn's words for a process without a shared ledger (the header's layout)."""
    return [0] * HEADER


def held(words: Words, estimate: int, now: int | None = None) -> int:
    """The bytes a waiting larger request holds that a request of ``estimate`` bytes must leave
    free beside the reservations (0: no turn, an expired one, or this request is as large)."""
    turn = words[H_TURN]
    if turn <= 0:
        return 0
    if words[H_TURN_UNTIL] < (time.monotonic_ns() if now is None else now):
        words[H_TURN] = 0  # over: nobody is held back by it any more
        return 0
    return 0 if estimate * TURN_SHARE >= turn else int(turn)


def take(words: Words, estimate: int, now: int | None = None) -> bool:
    """A request of ``estimate`` bytes was refused for the budget although it could fit: it takes
    the turn, unless one is live for a request of its size or larger (the first one waiting keeps
    it; its size renews it), or one was just served. True when it took it."""
    now = time.monotonic_ns() if now is None else now
    turn = words[H_TURN]
    if turn != 0 and words[H_TURN_UNTIL] >= now:
        if turn < 0:
            return False  # resting after a served turn: the flood has its room back for a while
        if estimate * TURN_SHARE < turn:
            return False  # smaller: it is what the turn holds room against
        if estimate < turn * TURN_SHARE:
            words[H_TURN_UNTIL] = now + TURN_TTL_NS  # its size: its own retry (any worker) renews it
            return False
        # Far larger than the turn (a small request's turn): it takes it over, or a flood of small
        # requests renewing their own turn would keep a large one from ever having one.
    words[H_TURN_UNTIL] = now + TURN_TTL_NS  # the deadline first: a reader never sees bytes with an old one
    words[H_TURN] = estimate
    return True


def served(words: Words, estimate: int, now: int | None = None) -> None:
    """A request of ``estimate`` bytes was admitted: if it is the size the turn waits for, the
    turn has come. It ends, and no other is taken for ``TURN_REST_NS``: one large request gets
    its turn, then the flood has the room back; otherwise the next large one's retry (a few
    clients sending large uploads retry every 50 ms) would hold the room again at once, and the
    small requests would be the ones starved. The rest bounds how often that happens: at most one
    turn per ``TURN_REST_NS`` plus the time it waits."""
    turn = words[H_TURN]
    if turn > 0 and estimate * TURN_SHARE >= turn:
        words[H_TURN_UNTIL] = (time.monotonic_ns() if now is None else now) + TURN_REST_NS
        words[H_TURN] = -turn
