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
