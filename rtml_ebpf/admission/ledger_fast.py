"""The ledger's request path: claim, then look. No lock, no system call.

An admission decision must not let two processes spend the same headroom. It used to take an
exclusive ``flock`` around reading every row and writing its own: two system calls per request,
and every worker of the cgroup queued on one file. Rows are single-writer (each process writes
its own, under its Admission's lock), so a decision needs no lock if it is made in this order:

1. *claim*: write this process's row as if the request were admitted (its estimate reserved, one
   more in flight, one more learning);
2. a full fence, so no load below is ordered before those stores;
3. *look*: sum the other rows, and decide; a refusal writes the row back as it was.

Two processes deciding at once each see the other's claim (whichever fence comes second sees the
first one's stores), so at worst both refuse where one would have fitted, never both admit into
the same bytes: the safe side, as a reservation published late is. Every word is an aligned 8-byte
store, so a reader sees each value whole; a row's fields may be from two publications, each of
which was a state the budget allowed.

The claim, the fence and the sums are one C call (``rtml_ebpf._hot.ledger_claim``); where the
extension was not built, memoryview stores and slices, the fence taken from a lock's atomic
operation.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from .ledger_layout import FIELDS, H_USED, HEADER, INFLIGHT, LARGEST, LEARNING, PER_KIB, RESERVED, UPDATED

Others = tuple[int, int, int, int, int]  # others' reserved, inflight, learning; everyone's largest, per KiB

_fence_lock = threading.Lock()


def _others_py(rows: memoryview, own: int) -> Others:
    """The sums of ``others`` in Python: acquiring and releasing a lock is a locked (fencing)
    instruction on x86 and a barrier pair elsewhere."""
    with _fence_lock:
        pass
    used = rows[H_USED]
    body = rows[HEADER : HEADER + used * FIELDS]
    base = HEADER + own * FIELDS
    mine = (rows[base + RESERVED], rows[base + INFLIGHT], rows[base + LEARNING]) if 0 <= own < used else (0, 0, 0)
    return (sum(body[RESERVED::FIELDS]) - mine[0], sum(body[INFLIGHT::FIELDS]) - mine[1],
            sum(body[LEARNING::FIELDS]) - mine[2], max(body[LARGEST::FIELDS], default=0),
            max(body[PER_KIB::FIELDS], default=0))


def _claim_py(rows: memoryview, own: int, reserved: int, inflight: int, learning: int, largest: int,
              per_kib: int) -> Others:
    base = HEADER + own * FIELDS
    rows[base + LARGEST] = largest
    rows[base + PER_KIB] = per_kib
    rows[base + RESERVED] = reserved if reserved > 0 else 0
    rows[base + INFLIGHT] = inflight
    rows[base + LEARNING] = learning
    rows[base + UPDATED] = time.monotonic_ns()
    return _others_py(rows, own)


others: Callable[[memoryview, int], Others]
claim: Callable[[memoryview, int, int, int, int, int, int], Others]
try:
    from .._hot import ledger_claim as claim
    from .._hot import ledger_others as others
except ImportError:  # built without a compiler
    others, claim = _others_py, _claim_py
# others(rows, own_row): after a full fence, (reserved, inflight, learning) of every row but
# own_row, and (largest, per_kib) of every row. claim(rows, own_row, reserved, inflight, learning,
# largest, per_kib): own_row written (and when), then others(). ``rows``: the mapping's int64 view.
