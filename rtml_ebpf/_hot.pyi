from typing import Any

class Verdict:
    """Calling it returns whether the byte at ``offset`` of ``buffer`` (or ``ahead[0]``) is nonzero.

    (rtml_ebpf/_hot.c)"""

    watch: Any
    def __init__(self, buffer: Any, offset: int = 0, ahead: Any = None) -> None: ...
    def __call__(self) -> bool: ...
    def __getitem__(self, index: int) -> bool: ...

def ledger_others(buffer: Any, own_row: int, /) -> tuple[int, int, int, int, int]:
    """(reserved, inflight, learning) of every ledger row but ``own_row``, and (largest, per_kib)
    of every row, after a full fence (rtml_ebpf/_hot.c)."""

def ledger_claim(buffer: Any, own_row: int, reserved: int, inflight: int, learning: int, largest: int, per_kib: int,
                 /) -> tuple[int, int, int, int, int]:
    """Write ``own_row`` (and the time of the write), then :func:`ledger_others` (rtml_ebpf/_hot.c)."""

class Room:
    """Calling it returns (bytes before the rule trips, bytes before the OOM killer acts) of one
    watched slot, None where unlimited (rtml_ebpf/_hot.c; ebpf/words.py room_from_pages)."""

    def __init__(self, words: Any, config_words: Any, usage: int, limit: int, headroom: int, high: int,
                 high_room: int, inactive_delta: int, inactive_base: int, working_set: bool, trip_ppm: int,
                 trip_bytes: int, unlimited_pages: int, page_size: int) -> None: ...
    def __call__(self) -> tuple[int | None, int | None]: ...
    def fits(self, rows: Any, own_row: int, reserved: int, inflight: int, learning: int, largest: int, per_kib: int,
             estimate: int, /) -> tuple[int, int | None] | None:
        """The ledger claimed (``estimate`` added to ``reserved``, one more in flight), then the room:
        (others' reserved, bytes before the OOM killer) when ``estimate`` fits, else None."""

class Window:
    """The last ``n`` values, also kept sorted (rtml_ebpf/_hot.c; admission/estimator.py _PyWindow)."""

    ordered: list[int]
    def __init__(self, n: int) -> None: ...
    def add(self, v: int, /) -> int: ...
    def rank(self, q: float, /) -> int: ...
    def __len__(self) -> int: ...
