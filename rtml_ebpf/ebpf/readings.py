"""Readings of watched slots: the kernel's words (lock-free where admission reads them on every
request), the per-CPU counters, and user space's own readings of the cgroup files written into
a slot where no memcg events feed it. A base class of :class:`rtml_ebpf.ebpf.slots.Slots`, which
owns the maps and the states; kept apart so Slots is allocation and rules."""

from __future__ import annotations

import ctypes
import mmap
import time
from dataclasses import dataclass, field

from .._cgroup import MemoryCgroup
from .._high import HighSnapshot, snapshot_ceiling
from .._rules import Rule, Usage, evaluate
from ..cgroup_files import CgroupFiles
from ..config import PAGE_SIZE
from ..errors import CgroupNotFound, RtmlError
from ..snapshot import Snapshot
from . import abi, hooks
from . import libbpf as _libbpf
from .loader import Loaded
from .words import (
    _file_oom_kills,
    possible_cpus,
    read_consistent,
    room_from_pages,
    slot_high,
    slot_readings,
    write_high,
)

SLOT_SIZE = ctypes.sizeof(abi.Slot)
CONFIG_SIZE = ctypes.sizeof(abi.Config)


@dataclass
class SlotState:
    index: int
    cgroup: MemoryCgroup
    cgroup_id: int
    reader: CgroupFiles  # the cgroup's files, for the initial reading and the upkeep (caches limits)
    rules: dict[int, Rule] = field(default_factory=dict)
    # Rules closed while their Watch lives on (a caller kept the bound check): the byte keeps
    # the fail answer and the index is not lent again until that Watch is collected, so a
    # stale check can never answer for another cgroup.
    quarantined: dict[int, bool] = field(default_factory=dict)  # rule index -> its fail answer
    ancestors: list[str] = field(default_factory=list)
    watched: bool = True
    keep: bool = False  # watched with no rule (the node agent's scan): stays until unwatch_cgroup


class SlotReadings:
    """The reading half of Slots (see rtml_ebpf.ebpf.slots)."""

    loaded: Loaded
    by_cgid: dict[int, SlotState]
    _slots_mm: mmap.mmap
    _configs_mm: mmap.mmap
    words: memoryview | None
    config_words: memoryview | None

    # -- user space's own readings (no memcg events) ---------------------------------------
    def upkeep(self, slot: int, cgid: int) -> None:
        """Without memcg events the programs see growth as it faults in, but not frees nor
        inactive_file: re-read both from the cgroup files, rewrite the slot's usage and
        re-evaluate the verdicts, so a cgroup that freed memory clears without its next fault."""
        state = self.by_cgid.get(cgid)
        if state is not None and state.index == slot and state.watched:
            self.write_reading(state, state.reader.read())

    def check_limit(self, slot: int, cgid: int) -> bool:
        """memcg-event kernels: a limit written while the cgroup is idle moves no counter, so
        the programs see it only at the next charge. Compare the files' effective limit with
        the slot's and rewrite the reading when they differ. True when it did."""
        state = self.by_cgid.get(cgid)
        if state is None or state.index != slot or not state.watched or self.words is None:
            return False
        limits = state.reader.limits_now()  # CgroupNotFound once the path is not this cgroup any more
        highs = state.cgroup.effective_high()
        pages = limits.limit_bytes // PAGE_SIZE if limits.limit_bytes is not None else abi.UNLIMITED_PAGES
        high = highs.limit_bytes // PAGE_SIZE if highs.limit_bytes is not None else abi.UNLIMITED_PAGES
        base = state.index * abi.SLOT_WORDS
        if pages == self.words[base + abi.W_LIMIT] and high == self.words[base + abi.W_HIGH]:
            return False
        self.write_reading(state, state.reader.read_now())
        return True

    def write_reading(self, state: SlotState, snap: Snapshot) -> None:
        """A reading of the files into the slot, and the verdicts re-evaluated against it."""
        cfg = abi.Config.from_buffer(self._configs_mm, state.index * CONFIG_SIZE)
        cfg.inactive_file_base = snap.inactive_file // PAGE_SIZE
        del cfg
        slot = abi.Slot.from_buffer(self._slots_mm, state.index * SLOT_SIZE)
        slot.inactive_file_delta = 0
        slot.usage_pages = snap.usage // PAGE_SIZE
        slot.limit_pages = snap.limit // PAGE_SIZE if snap.limit is not None else abi.UNLIMITED_PAGES
        slot.headroom_pages = snap.headroom // PAGE_SIZE if snap.headroom is not None else abi.UNLIMITED_PAGES
        write_high(slot, snap, state.ancestors)
        slot.updated_ns = time.monotonic_ns()
        usage = Usage(snap.used, snap.working_set, snapshot_ceiling(snap))
        for index, rule in state.rules.items():
            was = bool(slot.tripped[index])
            now = evaluate(rule, usage, was)
            if now != was:
                slot.tripped[index] = int(now)
                if now:
                    slot.trips[index] += 1
        del slot

    # -- the kernel's readings ----------------------------------------------------------------
    def read_slot(self, index: int) -> abi.Slot:
        """A consistent copy of one slot (retries while a writer is in the middle)."""
        return read_consistent(self._slots_mm, index * SLOT_SIZE)

    def _used(self, slot: int) -> tuple[int, int | None, int | None]:
        """(used pages as the tightest ancestor sees them, limit bytes, bytes before the OOM
        killer) from the slot's words: no syscall."""
        w = self.words
        if w is None:
            raise RtmlError("the eBPF runtime is closed")
        base = slot * abi.SLOT_WORDS
        usage, limit, headroom = w[base + abi.W_USAGE], w[base + abi.W_LIMIT], w[base + abi.W_HEADROOM]
        top, room = min(limit, w[base + abi.W_HIGH]), min(headroom, w[base + abi.W_HIGH_ROOM])
        used = usage if top >= abi.UNLIMITED_PAGES else top - room  # as the ceiling sees it (_high.py)
        if limit >= abi.UNLIMITED_PAGES:
            return used, None, None
        return used, limit * PAGE_SIZE, headroom * PAGE_SIZE

    def used_bytes(self, slot: int) -> int:
        """Usage as the tightest ancestor sees it, in bytes (the growth rate's reading)."""
        return max(0, self._used(slot)[0]) * PAGE_SIZE

    def room(self, slot: int, rule: Rule) -> tuple[int | None, int | None]:
        """(bytes before ``rule`` trips, bytes before the OOM killer acts) from the slot: a few
        word reads, no syscall (admission calls it on every request). None: unlimited."""
        w, cw = self.words, self.config_words
        if w is None or cw is None:
            raise RtmlError("the eBPF runtime is closed")
        base = slot * abi.SLOT_WORDS
        inactive = cw[slot * abi.CONFIG_WORDS + 1] + w[base + abi.W_INACTIVE_DELTA]
        return room_from_pages(w[base + abi.W_USAGE], w[base + abi.W_LIMIT], w[base + abi.W_HEADROOM], inactive,
                               rule, w[base + abi.W_HIGH], w[base + abi.W_HIGH_ROOM])

    def read_counters(self, index: int) -> abi.Counters:
        """The per-CPU counters of one slot, summed."""
        values = (abi.Counters * possible_cpus())()
        key = ctypes.c_uint32(index)
        _libbpf.check(_libbpf.lib().bpf_map_lookup_elem(self.loaded.fds["counters"], ctypes.byref(key), values),
                      "read", "counters")
        words = memoryview(values).cast("B").cast("Q")  # per CPU, the struct's u64 fields in order
        n = len(abi.Counters._fields_)
        return abi.Counters(*(sum(words[i::n]) for i in range(n)))

    def snapshot(self, state: SlotState, *, full: bool, refresh_from_files: bool) -> Snapshot:
        if refresh_from_files:
            # Without memcg events the slot cannot see frees nor inactive_file: the files are
            # the truth. Re-read them and refresh the slot (and its verdicts) with them.
            try:
                self.write_reading(state, state.reader.read())
            except (FileNotFoundError, CgroupNotFound):
                pass  # removed (or made again: another cgroup): the slot keeps the kernel's last word
        s = self.read_slot(state.index)
        c = self.read_counters(state.index) if full else abi.Counters()
        cfg = abi.Config.from_buffer_copy(
            self._configs_mm[state.index * CONFIG_SIZE : (state.index + 1) * CONFIG_SIZE])
        links = self.loaded.links
        return HighSnapshot(
            **slot_readings(s, cfg.inactive_file_base, state.ancestors), **slot_high(s, state.ancestors),
            oom_kills=int(s.oom_kills) if hooks.OOM_VICTIM in links else _file_oom_kills(state.cgroup),
            faults=c.faults if hooks.PAGE_FAULT_USER in links else None,
            events=c.events,
            growth={k: (int(getattr(c, f"{k}_charged")) * PAGE_SIZE, int(getattr(c, f"{k}_uncharged")) * PAGE_SIZE)
                    for k in abi.GROWTH_KINDS},
        )
