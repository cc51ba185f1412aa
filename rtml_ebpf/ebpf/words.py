"""A slot's words as both sides read them: rules encoded for the programs, consistent copies
of a slot (the slots map or a client's page), and the readings in bytes. No state, no locking:
used by the runtime's Slots, the agent and its clients alike."""

from __future__ import annotations

import ctypes
import functools
import os
import struct
from typing import Any

from .._cgroup import MemoryCgroup
from .._high import ceiling_used
from .._rules import Rule, Threshold
from ..config import PAGE_SIZE
from ..snapshot import Snapshot
from . import abi

SLOT_SIZE = ctypes.sizeof(abi.Slot)
_U64 = struct.Struct("=Q")


@functools.cache
def possible_cpus() -> int:
    """Per-CPU maps hold one value per possible CPU (not online, not cpu_count); fixed at boot."""
    try:
        with open("/sys/devices/system/cpu/possible") as f:
            text = f.read().strip()
    except OSError:
        return os.cpu_count() or 1
    n = 0
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        n += (int(hi) if hi else int(lo)) - int(lo) + 1
    return n


def _file_oom_kills(cgroup: MemoryCgroup) -> int:
    """Without the oom_victim hook (before 6.8) the cgroup's own counter stands in."""
    try:
        return cgroup.oom_kills()
    except OSError:
        return 0


def encode_rule(rule: Rule) -> tuple[int, int, int, int]:
    """(kind, metric, trip, clear) as the programs read them (struct rtml_rule)."""
    metric = abi.METRIC_WORKING_SET if rule.metric == "working_set" else abi.METRIC_USAGE
    if rule.trip.nbytes is not None:
        return abi.RULE_PAGES, metric, rule.trip.nbytes // PAGE_SIZE, (rule.clear.nbytes or 0) // PAGE_SIZE
    return abi.RULE_FRACTION, metric, rule.trip.ppm or 0, rule.clear.ppm or 0


def decode_rule(kind: int, metric: int, trip: int, clear: int) -> Rule:
    """The inverse of :func:`encode_rule` (bytes rounded down to pages)."""
    name = "working_set" if metric == abi.METRIC_WORKING_SET else "usage"
    if kind == abi.RULE_PAGES:
        return Rule(name, Threshold(nbytes=trip * PAGE_SIZE), Threshold(nbytes=clear * PAGE_SIZE))
    return Rule(name, Threshold(ppm=trip), Threshold(ppm=clear))


def read_consistent(buf: Any, base: int = 0) -> abi.Slot:
    """A consistent copy of the slot at ``base`` in ``buf`` (the slots map, or a client's page):
    retried while a writer is between its sequence bumps."""
    raw = b""
    for _ in range(100):
        end_before = _U64.unpack_from(buf, base + abi.SEQ_END_OFFSET)[0]
        raw = bytes(buf[base : base + SLOT_SIZE])
        if _U64.unpack_from(buf, base + abi.SEQ_BEGIN_OFFSET)[0] == end_before:
            break
    return abi.Slot.from_buffer_copy(raw)


def room_from_pages(usage: int, limit: int, headroom: int, inactive: int, rule: Rule,
                    high: int = abi.UNLIMITED_PAGES, high_room: int = abi.UNLIMITED_PAGES,
                    ) -> tuple[int | None, int | None]:
    """(bytes before ``rule`` trips, bytes before the OOM killer acts) from a slot's words (pages);
    None: unlimited. Fractions apply to the ceiling, the lower of max and memory.high (_high.py)."""
    top, room = min(limit, high), min(headroom, high_room)
    used = usage if top >= abi.UNLIMITED_PAGES else top - room
    limit_room = None if limit >= abi.UNLIMITED_PAGES else headroom * PAGE_SIZE
    if rule.metric == "working_set":
        used = max(0, used - inactive)
    trip = rule.trip.resolve(None if top >= abi.UNLIMITED_PAGES else top * PAGE_SIZE)
    return (None if trip is None else trip - used * PAGE_SIZE), limit_room


def _named(depth: int, ancestors: list[str]) -> str:
    if depth < len(ancestors):
        return ancestors[depth]
    return f"(an ancestor {depth} levels up, above the cgroup mount root)"


def write_high(slot: abi.Slot, snap: Snapshot, ancestors: list[str]) -> None:
    """A file reading's memory.high into a slot (user space's writes: the first reading, the upkeep)."""
    high, room = getattr(snap, "high", None), getattr(snap, "high_room", None)
    source = getattr(snap, "high_source", None)
    slot.high_pages = abi.UNLIMITED_PAGES if high is None else high // PAGE_SIZE
    slot.high_room_pages = abi.UNLIMITED_PAGES if room is None else room // PAGE_SIZE
    slot.high_depth = ancestors.index(source) if source in ancestors else 0


def slot_high(s: abi.Slot, ancestors: list[str]) -> dict[str, Any]:
    """The memory.high fields of a slot in bytes, for a HighSnapshot (high, high_source)."""
    if s.high_pages >= abi.UNLIMITED_PAGES:
        return {"high": None, "high_source": None}
    return {"high": s.high_pages * PAGE_SIZE, "high_source": _named(int(s.high_depth), ancestors)}


def slot_readings(s: abi.Slot, inactive_base: int, ancestors: list[str]) -> dict[str, Any]:
    """The Snapshot fields a slot holds, in bytes (``inactive_base``: pages read at registration;
    ``ancestors``: the cgroup's directory and its parents, to name the limit's source)."""
    limit = s.limit_pages * PAGE_SIZE if s.limit_pages < abi.UNLIMITED_PAGES else None
    headroom = s.headroom_pages * PAGE_SIZE if limit is not None else None
    usage = s.usage_pages * PAGE_SIZE
    source = None if limit is None else _named(int(s.limit_depth), ancestors)
    high = s.high_pages * PAGE_SIZE if s.high_pages < abi.UNLIMITED_PAGES else None
    high_room = s.high_room_pages * PAGE_SIZE if high is not None else None
    return {"usage": usage, "used": ceiling_used(usage, limit, headroom, high, high_room),
            "inactive_file": max(0, (inactive_base + s.inactive_file_delta) * PAGE_SIZE), "limit": limit,
            "limit_source": source, "headroom": headroom, "updated_ns": int(s.updated_ns)}
