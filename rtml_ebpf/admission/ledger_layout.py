"""The ledger file's layout (rtml_ebpf/_hot.c's ``ledger_others`` reads the same words).

A header of HEADER int64 (magic, version, rows, rows in use: a high-water mark readers sum below),
then ROWS rows of FIELDS int64, one per process, written only by that process.
"""

from __future__ import annotations

MAGIC = 0x52544D4C4C454447  # "RTMLLEDG"
VERSION = 1
ROWS = 128  # processes of one cgroup that can share a ledger
FIELDS = 8  # int64 per row
# LARGEST: the largest estimate known; PER_KIB: the largest cost per KiB of body known (a process
# that has not learned a sized route yet scales by it instead of guessing from a small request)
PID, START, RESERVED, INFLIGHT, LEARNING, UPDATED, LARGEST, PER_KIB = range(8)
HEADER = 8  # int64 of header: magic, version, rows, rows in use (high-water mark), ...
H_USED = 3
# A fair turn (admission/turn.py): the bytes a refused large request holds room for, and until when
# (CLOCK_MONOTONIC ns, one clock for every process). Written by any process, no lock: a lost or
# overwritten turn is only less fair, never a request admitted into bytes that are not there.
H_TURN, H_TURN_UNTIL = 4, 5
SIZE = (HEADER + ROWS * FIELDS) * 8
