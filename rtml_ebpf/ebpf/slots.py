"""Watched cgroups on a loaded object: slot allocation, rule encoding, and the kernel's readings.

A *slot* is one watched cgroup: its element of the mmapped ``slots`` array (written by the
programs), of ``configs`` (its rules, written here) and of the per-CPU ``counters``. A cgroup
has up to ``MAX_RULES`` rules, each with one verdict byte the hot path reads. Nothing here locks:
the runtime (runtime.py) serializes every call.
"""

from __future__ import annotations

import ctypes
import os
import time
from collections.abc import Collection

from .._cgroup import MemoryCgroup
from .._high import snapshot_ceiling
from .._rules import Rule, Usage, evaluate
from ..cgroup_files import CgroupFiles
from ..config import PAGE_SIZE
from ..errors import CapacityError, RtmlError
from ..snapshot import Snapshot
from . import abi
from . import libbpf as _libbpf
from .loader import Loaded
from .readings import SlotReadings, SlotState
from .words import (  # re-exported (__all__): the agent imports them from here
    decode_rule,
    encode_rule,
    possible_cpus,
    read_consistent,
    room_from_pages,
    slot_readings,
    write_high,
)

__all__ = ["Slots", "SlotState", "decode_rule", "encode_rule", "possible_cpus", "read_consistent",
           "room_from_pages", "slot_readings"]

SLOT_SIZE = ctypes.sizeof(abi.Slot)
CONFIG_SIZE = ctypes.sizeof(abi.Config)
RULE_SIZE = ctypes.sizeof(abi.Rule)
# Watched cgroups on one path that a single event refreshes (RTML_NESTED_WATCHES in rtml.h).
NESTED_WATCHES = abi.NESTED_WATCHES


class Slots(SlotReadings):
    def __init__(self, loaded: Loaded, capacity: int = abi.MAX_SLOTS) -> None:
        self.loaded = loaded
        self.capacity = capacity
        self.by_cgid: dict[int, SlotState] = {}
        # Slots a new cgroup takes first when free: the node agent's, whose client pages it made
        # ahead (agent/leases.py, page_to_warm); else the lowest free index.
        self.preferred: Collection[int] = ()
        self._slots_mm = loaded.maps["slots"]
        self._configs_mm = loaded.maps["configs"]
        self.view: memoryview | None = memoryview(self._slots_mm)
        self.words: memoryview | None = self.view.cast("q")
        self.config_words: memoryview | None = memoryview(self._configs_mm).cast("q")

    def release_views(self) -> None:
        """Drop our own views so the mappings can close (kept checks hold theirs)."""
        self.view = self.words = self.config_words = None

    # -- registration ---------------------------------------------------------------------
    def register(self, cgroup: MemoryCgroup, rule: Rule) -> tuple[int, int, memoryview]:
        """Watch ``cgroup`` with ``rule``: (slot index, rule index, its one-byte verdict view)."""
        assert self.view is not None
        state, fresh = self._slot_for(cgroup)
        taken = set(state.rules) | set(state.quarantined)
        rule_index = next((i for i in range(abi.MAX_RULES) if i not in taken), None)
        if rule_index is None:
            raise CapacityError(
                f"cgroup {cgroup.directory} already has {abi.MAX_RULES} thresholds watched in this "
                "process; share a Limiter instead of creating more"
            )
        snap = state.reader.read()
        tripped = evaluate(rule, Usage(snap.used, snap.working_set, snapshot_ceiling(snap)), False)
        if fresh:
            self._init_slot(state, cgroup, snap)
        self._slots_mm[state.index * SLOT_SIZE + abi.TRIPPED_OFFSET + rule_index] = int(tripped)
        self._write_rule(state.index, rule_index, rule)
        state.rules[rule_index] = rule
        if fresh:
            self._watch(state)
        off = state.index * SLOT_SIZE + abi.TRIPPED_OFFSET + rule_index
        return state.index, rule_index, self.view[off : off + 1]

    def _slot_for(self, cgroup: MemoryCgroup) -> tuple[SlotState, bool]:
        """The cgroup's slot (a free one for a new cgroup) and whether it must be (re)watched."""
        state = self.by_cgid.get(cgroup.cgroup_id)
        fresh = state is None or not state.watched
        if state is None:
            self.check_nesting(cgroup)
            used = {s.index for s in self.by_cgid.values()}
            free = next((i for i in self.preferred if i not in used and i < self.capacity), None)
            if free is None:
                free = next((i for i in range(self.capacity) if i not in used), None)
            if free is None:
                raise CapacityError(f"all {self.capacity} eBPF slots are in use; close Limiters you no longer need")
            cgid = cgroup.cgroup_id
            state = SlotState(free, cgroup, cgid, CgroupFiles(cgroup, cgroup_id=cgid),
                              ancestors=cgroup.ancestors())
        elif not state.watched:
            self.check_nesting(cgroup)
        return state, fresh

    def _watch(self, state: SlotState) -> None:
        key = ctypes.c_uint64(state.cgroup_id)
        value = ctypes.c_uint32(state.index)
        _libbpf.check(_libbpf.lib().bpf_map_update_elem(self.loaded.fds["watch"], ctypes.byref(key),
                                                        ctypes.byref(value), 0), "watch", state.cgroup.directory)
        state.watched = True
        self.by_cgid[state.cgroup_id] = state
        self._update_ctl()

    def watch(self, cgroup: MemoryCgroup) -> SlotState:
        """Watch a cgroup with no rule yet (the node agent): it stays watched until
        :meth:`unwatch_cgroup`, whatever its rules do."""
        state, fresh = self._slot_for(cgroup)
        state.keep = True
        if fresh:
            self._init_slot(state, cgroup, state.reader.read())
            self._watch(state)
        return state

    def unwatch_cgroup(self, cgid: int) -> SlotState | None:
        """Stop watching a cgroup and free its slot, rules and all (the node agent, when the
        cgroup is gone or no longer wanted). Returns the freed state."""
        state = self.by_cgid.pop(cgid, None)
        if state is not None:
            for index in list(state.rules):
                self._write_rule(state.index, index, None)
            state.rules.clear()
            self._unwatch(state)
        return state

    def adopt(self, cgroups: dict[int, MemoryCgroup]) -> dict[int, dict[int, abi.Rule]]:
        """Rebuild the states of a pinned object another agent left: every cgroup in the
        watch map that still exists (``cgroups``: id -> cgroup) is kept with its rules as the
        programs see them; the others are unwatched. Returns cgroup id -> {rule index: rule}."""
        lib = _libbpf.lib()
        fd = self.loaded.fds["watch"]
        key, nxt, value = ctypes.c_uint64(), ctypes.c_uint64(), ctypes.c_uint32()
        entries: dict[int, int] = {}
        prev = None
        while lib.bpf_map_get_next_key(fd, prev, ctypes.byref(nxt)) == 0:
            key.value = nxt.value
            if lib.bpf_map_lookup_elem(fd, ctypes.byref(key), ctypes.byref(value)) == 0:
                entries[key.value] = value.value
            prev = ctypes.byref(key)
        found: dict[int, dict[int, abi.Rule]] = {}
        for cgid, index in entries.items():
            cgroup = cgroups.get(cgid)
            if cgroup is None or index >= self.capacity:
                k = ctypes.c_uint64(cgid)
                lib.bpf_map_delete_elem(fd, ctypes.byref(k))
                continue
            state = SlotState(index, cgroup, cgid, CgroupFiles(cgroup, cgroup_id=cgid),
                              ancestors=cgroup.ancestors(),
                              keep=True)
            cfg = abi.Config.from_buffer_copy(self._configs_mm[index * CONFIG_SIZE : (index + 1) * CONFIG_SIZE])
            found[cgid] = {i: r for i, r in enumerate(cfg.rules) if r.kind != abi.RULE_OFF}
            self.by_cgid[cgid] = state
        self._update_ctl()
        return found

    def set_rule(self, state: SlotState, rule_index: int, rule: Rule | None) -> None:
        """The node agent's rules: written (or turned off) at a chosen index."""
        if rule is None:
            state.rules.pop(rule_index, None)
            self._write_rule(state.index, rule_index, None)
            self._slots_mm[state.index * SLOT_SIZE + abi.TRIPPED_OFFSET + rule_index] = 0
            return
        snap = state.reader.read()
        tripped = evaluate(rule, Usage(snap.used, snap.working_set, snapshot_ceiling(snap)), False)
        self._slots_mm[state.index * SLOT_SIZE + abi.TRIPPED_OFFSET + rule_index] = int(tripped)
        self._write_rule(state.index, rule_index, rule)
        state.rules[rule_index] = rule

    def check_nesting(self, cgroup: MemoryCgroup) -> None:
        """The programs refresh at most NESTED_WATCHES watched cgroups on one path: refuse a
        third rather than leave one of them silently stale."""
        new = os.path.normpath(cgroup.directory)

        def on_path(a: str, b: str) -> bool:  # a is b or an ancestor of b
            return a == b or b.startswith(a + os.sep)

        others = [os.path.normpath(s.cgroup.directory) for s in self.by_cgid.values() if s.watched]
        chains = [[d for d in others if on_path(d, new) or on_path(new, d)]]
        for d in others:
            if on_path(new, d):  # a watched descendant: its own chain gains the new cgroup
                chains.append([e for e in others if on_path(e, d)])
        worst = max(chains, key=len)
        if len(worst) + 1 > NESTED_WATCHES:
            raise CapacityError(
                f"cgroup {cgroup.directory}: {', '.join(sorted(worst))} already watched on the same path; the "
                f"programs follow at most {NESTED_WATCHES} nested watched cgroups per path. Watch the pod or "
                "the container, not both plus a third level"
            )

    def close_rule(self, slot: int, rule: int, cgid: int, fail_answer: bool) -> None:
        """A Limiter closed: its rule stops, its byte answers ``fail_answer`` while kept checks
        live (quarantined), and the cgroup is unwatched when it has no rule left."""
        state = self.by_cgid.get(cgid)
        if state is None or state.index != slot or rule not in state.rules:
            return
        del state.rules[rule]
        self._write_rule(slot, rule, None)
        self._slots_mm[slot * SLOT_SIZE + abi.TRIPPED_OFFSET + rule] = int(fail_answer)
        state.quarantined[rule] = fail_answer
        if not state.rules and not state.keep:
            self._unwatch(state)

    def free_rule(self, slot: int, rule: int, cgid: int) -> None:
        """Nothing holds the rule any more (its Watch was collected): free its index, and the
        slot when it has nothing left."""
        state = self.by_cgid.get(cgid)
        if state is None or state.index != slot:
            return
        if rule in state.rules:  # its Limiter was dropped without close()
            del state.rules[rule]
            self._write_rule(slot, rule, None)
        state.quarantined.pop(rule, None)
        if not state.rules and not state.keep:
            self._unwatch(state)
            if not state.quarantined:
                del self.by_cgid[cgid]

    def _unwatch(self, state: SlotState) -> None:
        if state.watched:
            state.watched = False
            key = ctypes.c_uint64(state.cgroup_id)
            _libbpf.lib().bpf_map_delete_elem(self.loaded.fds["watch"], ctypes.byref(key))
            self._update_ctl()

    def _init_slot(self, state: SlotState, cgroup: MemoryCgroup, snap: Snapshot) -> None:
        slot = abi.Slot()
        slot.cgroup_id = cgroup.cgroup_id
        slot.level = cgroup.depth
        slot.usage_pages = snap.usage // PAGE_SIZE
        slot.limit_pages = (snap.limit // PAGE_SIZE) if snap.limit is not None else abi.UNLIMITED_PAGES
        slot.headroom_pages = (snap.headroom // PAGE_SIZE) if snap.headroom is not None else abi.UNLIMITED_PAGES
        write_high(slot, snap, state.ancestors)
        slot.updated_ns = time.monotonic_ns()
        for rule, fail_answer in state.quarantined.items():
            slot.tripped[rule] = int(fail_answer)  # kept checks of closed Limiters keep their answer
        base = state.index * SLOT_SIZE
        self._slots_mm[base : base + SLOT_SIZE] = bytes(slot)
        zeros = (abi.Counters * possible_cpus())()  # a reused slot starts from zero
        key = ctypes.c_uint32(state.index)
        _libbpf.check(_libbpf.lib().bpf_map_update_elem(self.loaded.fds["counters"], ctypes.byref(key), zeros, 0),
                      "reset", "counters")
        cfg = abi.Config()
        cfg.cgroup_id = cgroup.cgroup_id
        cfg.inactive_file_base = snap.inactive_file // PAGE_SIZE
        cbase = state.index * CONFIG_SIZE
        self._configs_mm[cbase : cbase + CONFIG_SIZE] = bytes(cfg)

    def _write_rule(self, slot: int, index: int, rule: Rule | None) -> None:
        off = slot * CONFIG_SIZE + abi.Config.rules.offset + index * RULE_SIZE
        r = abi.Rule.from_buffer(self._configs_mm, off)
        r.kind = abi.RULE_OFF  # off while the values change
        if rule is None:
            return
        kind, r.metric, r.trip, r.clear = encode_rule(rule)
        r.kind = kind
        del r

    def _update_ctl(self) -> None:
        ctl = abi.Ctl.from_buffer(self.loaded.maps["ctl"])
        states = [s for s in self.by_cgid.values() if s.watched]
        ctl.min_level = min((s.cgroup.depth for s in states), default=0)
        ctl.nwatched = len(states)
        ctl.gen = (ctl.gen + 1) & 0xFFFFFFFF  # after the watch map changed: drops the programs' caches
        del ctl

    def state(self, slot: int, cgid: int) -> SlotState:
        state = self.by_cgid.get(cgid)
        if state is None or state.index != slot:
            raise RtmlError("this Limiter is closed: its eBPF watch is gone")
        return state
