"""A process's row of the ledger: taking a free one, and clearing those of processes that are gone
(a killed worker cannot clear its own)."""

from __future__ import annotations

import os

from ..errors import ConfigError
from .ledger_layout import FIELDS, H_USED, HEADER, MAGIC, PID, ROWS, START, VERSION


def process_start_time(pid: int) -> int | None:
    """Field 22 of /proc/<pid>/stat (clock ticks since boot), None when gone or a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            text = f.read()
    except OSError:
        return None
    fields = text[text.rfind(b")") + 2 :].split()
    if not fields or fields[0] == b"Z":
        return None
    return int(fields[19])


def reap(rows: memoryview, own_row: int) -> None:
    """Clear rows of processes that are gone (killed workers leave theirs behind)."""
    for r in range(ROWS):
        base = HEADER + r * FIELDS
        pid = rows[base + PID]
        if pid == 0 or (pid == os.getpid() and r == own_row):
            continue
        start = process_start_time(pid)
        if start is None or (rows[base + START] and start != rows[base + START]):
            rows[base + PID] = 0
            for i in range(1, FIELDS):
                rows[base + i] = 0


def take_row(rows: memoryview, path: str) -> tuple[int, int]:
    """A free row for this process (under the file's exclusive flock): (row, start time)."""
    if rows[0] != MAGIC:
        rows[1], rows[2], rows[0] = VERSION, ROWS, MAGIC
    elif rows[1] != VERSION or rows[2] != ROWS:
        raise ConfigError(f"ledger {path}: written by another rtml-ebpf version; remove it")
    start = process_start_time(os.getpid()) or 0
    reap(rows, -1)
    row = next((r for r in range(ROWS) if rows[HEADER + r * FIELDS + PID] == 0), -1)
    if row < 0:
        raise ConfigError(f"ledger {path}: all {ROWS} rows are in use by live processes")
    base = HEADER + row * FIELDS
    for i in range(FIELDS):
        rows[base + i] = 0
    rows[base + START] = start
    rows[base + PID] = os.getpid()
    rows[H_USED] = max(rows[H_USED], row + 1)  # readers sum rows below this mark only
    return row, start
