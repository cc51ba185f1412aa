"""Loads the packaged BPF object once per process and lends out watched-cgroup slots.

Order is fixed, as in libbpf-tools loaders: probe, open, turn off hooks the
kernel lacks, load, attach each hook, map the arrays. Whatever was made is
undone in reverse on any failure, and on the last release.

The hot path never comes here: a Limiter holds a one-byte memoryview into the
``slots`` mapping, which the BPF programs keep current.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import os
import struct
import threading
import time
from dataclasses import dataclass, field

from . import _abi, _features, _libbpf
from ._backend import Snapshot
from ._cgroup import MemoryCgroup
from ._poll import PollBackend
from ._rules import Rule, Usage, effective_used, evaluate
from .errors import ConfigError, LoadError, NotSupported, RtmlError

log = logging.getLogger("rtml_ebpf")

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
OBJECT_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bpf", "rtml.bpf.o")
SLOT_SIZE = ctypes.sizeof(_abi.Slot)
CONFIG_SIZE = ctypes.sizeof(_abi.Config)
RULE_SIZE = ctypes.sizeof(_abi.Rule)
_U64 = struct.Struct("=Q")


def hooks_from_env(value: str | None = None) -> tuple[str, ...] | None:
    """RTML_HOOKS: unset/"auto" -> what the kernel offers, page_fault_user only where the memcg
    events are missing; "all" -> everything the kernel offers; "fault" -> the pre-6.13 set; or a list."""
    value = os.environ.get("RTML_HOOKS", "") if value is None else value
    value = value.strip()
    if value in ("", "auto"):
        return None
    if value == "all":
        return _features.HOOK_NAMES
    if value == "fault":
        return _features.FAULT_HOOKS
    names = tuple(v.strip() for v in value.split(",") if v.strip())
    unknown = [n for n in names if n not in _features.HOOK_NAMES]
    if unknown:
        raise ConfigError(
            f"RTML_HOOKS={value!r}: unknown hook {unknown[0]!r}; use auto, fault or a comma list of "
            + ", ".join(_features.HOOK_NAMES)
        )
    return names


def _file_oom_kills(cgroup: MemoryCgroup) -> int:
    """Without the oom_victim hook (before 6.8) the cgroup's own counter stands in."""
    try:
        return cgroup.oom_kills()
    except OSError:
        return 0


def possible_cpus() -> int:
    """Per-CPU maps hold one value per possible CPU (not online, not cpu_count)."""
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


def _map_len(value_size: int, entries: int) -> int:
    # the kernel lays mmapable array elements at round_up(value_size, 8)
    size = ((value_size + 7) // 8 * 8) * entries
    return (size + PAGE_SIZE - 1) // PAGE_SIZE * PAGE_SIZE


@dataclass
class _SlotState:
    index: int
    cgroup: MemoryCgroup
    cgroup_id: int
    reader: PollBackend  # the cgroup's files, for the initial reading and the upkeep (caches limits)
    rules: dict[int, Rule] = field(default_factory=dict)
    ancestors: list[str] = field(default_factory=list)


class SlotFlag:
    """A Limiter's handle on one rule of one slot; ``flag[0]`` reads the kernel's verdict."""

    __slots__ = ("slot", "rule", "_view")

    def __init__(self, slot: int, rule: int, view: memoryview) -> None:
        self.slot = slot
        self.rule = rule
        self._view = view

    @property
    def view(self) -> memoryview:
        return self._view


class Runtime:
    """The loaded object, its links and mappings. One per process, shared and refcounted."""

    _instance: Runtime | None = None
    _class_lock = threading.Lock()

    # -- sharing ------------------------------------------------------------------------
    @classmethod
    def acquire(cls) -> Runtime:
        with cls._class_lock:
            inst = cls._instance
            if inst is None or inst._closed or inst.inherited:
                # A forked child builds its own: the inherited one belongs to its parent.
                inst = cls._instance = cls(hooks_from_env())
            inst._refs += 1
            return inst

    def release(self) -> None:
        with Runtime._class_lock:
            self._refs -= 1
            if self._refs <= 0:
                self.close()
                if Runtime._instance is self:
                    Runtime._instance = None

    @classmethod
    def current(cls) -> Runtime | None:
        inst = cls._instance
        return inst if inst is not None and not inst._closed else None

    # -- load ---------------------------------------------------------------------------
    def __init__(self, hooks: tuple[str, ...] | None = None) -> None:
        self._refs = 0
        self._closed = False
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._obj = 0
        self._links: dict[str, int] = {}
        self.prog_ids: dict[str, int] = {}
        self.skipped: dict[str, str] = {}
        self._maps: list[mmap.mmap] = []
        self._slots_by_cgid: dict[int, _SlotState] = {}
        try:
            self._load(hooks)
        except BaseException:
            self.close()
            raise

    def _load(self, wanted: tuple[str, ...] | None) -> None:
        _features.check_privileges()
        _features.check_btf()
        if not os.path.exists(OBJECT_PATH):
            raise NotSupported(
                "the BPF object",
                f"{OBJECT_PATH} is missing; build it with `make bpf` (needs clang) or reinstall the package",
            )
        lib = _libbpf.lib()
        _libbpf.take_log()
        self._obj = _libbpf.check_ptr(lib.bpf_object__open_file(OBJECT_PATH.encode(), None), "open", OBJECT_PATH)

        chosen: list[_features.Hook] = []
        memcg_events = all(
            _features.hook_unavailable(h) is None for h in _features.HOOKS if h.name in _features.MEMCG_HOOKS
        )
        for hook in _features.HOOKS:
            why = None
            if wanted is not None and hook.name not in wanted:
                why = "not requested (RTML_HOOKS)"
            elif wanted is None and hook.name == "page_fault_user" and memcg_events:
                # The memcg events already follow every charge; the fault hook would only count
                # faults, at about 10% of a fault's cost. RTML_HOOKS=all attaches it.
                why = "not needed: memcg events are live (RTML_HOOKS=all adds it to count faults)"
            else:
                why = _features.hook_unavailable(hook)
            prog = _libbpf.check_ptr(
                lib.bpf_object__find_program_by_name(self._obj, hook.program.encode()), "find program", hook.program
            )
            if why:
                self.skipped[hook.name] = why
                _libbpf.check(lib.bpf_program__set_autoload(prog, False), "disable", hook.program)
            else:
                chosen.append(hook)
        if not chosen:
            raise NotSupported("eBPF hooks", "; ".join(f"{k}: {v}" for k, v in self.skipped.items()))
        if any(h.name == "page_fault_user" for h in chosen):
            _features.ensure_tracefs()

        ret = lib.bpf_object__load(self._obj)
        if ret < 0:
            err = LoadError("load", "rtml.bpf.o", -ret, _libbpf.take_log())
            if -ret == 1:  # EPERM: memlock on old kernels, or lockdown
                err.args = (err.args[0] + "\nhint: EPERM at load; check RLIMIT_MEMLOCK and kernel lockdown",)
            raise err

        for hook in chosen:
            prog = lib.bpf_object__find_program_by_name(self._obj, hook.program.encode())
            link = lib.bpf_program__attach(prog)
            if not link:
                # A hook that loads but will not attach is reported, not fatal.
                errno = ctypes.get_errno()
                self.skipped[hook.name] = f"attach failed: {os.strerror(errno) if errno else 'unknown'}"
                _libbpf.take_log()
                continue
            self._links[hook.name] = link
            self.prog_ids[hook.name] = _libbpf.prog_id(lib.bpf_program__fd(prog))
        if not self._links:
            why = "; ".join(f"{k}: {v}" for k, v in self.skipped.items())
            raise NotSupported("eBPF hooks", "no hook attached: " + why)

        self._watch_fd = self._map_fd("watch")
        self._counters_fd = self._map_fd("counters")
        self._slots_mm = self._mmap("slots", SLOT_SIZE, _abi.MAX_SLOTS)
        self._configs_mm = self._mmap("configs", CONFIG_SIZE, _abi.MAX_SLOTS)
        self._ctl_mm = self._mmap("ctl", ctypes.sizeof(_abi.Ctl), 1)
        self._slots_view = memoryview(self._slots_mm)
        ctl = _abi.Ctl.from_buffer(self._ctl_mm)
        ctl.abi_version = _abi.ABI_VERSION
        memcg_live = "memcg_lruvec" in self._links or "memcg_state" in self._links
        ctl.flags = (_abi.CTL_TRACK_INACTIVE if "memcg_lruvec" in self._links else 0) | (
            0 if memcg_live else _abi.CTL_FAULT_REFRESH
        )
        del ctl
        from .relief import trim_heap

        trim_heap()  # libbpf parsed the kernel's BTF (megabytes) to relocate: hand that heap back
        log.info("rtml-ebpf: BPF hooks live: %s; skipped: %s", ", ".join(self._links) or "none",
                 "; ".join(f"{k} ({v})" for k, v in self.skipped.items()) or "none")

    def _map_fd(self, name: str) -> int:
        lib = _libbpf.lib()
        m = _libbpf.check_ptr(lib.bpf_object__find_map_by_name(self._obj, name.encode()), "find map", name)
        return _libbpf.check(lib.bpf_map__fd(m), "fd of map", name)

    def _mmap(self, name: str, value_size: int, entries: int) -> mmap.mmap:
        fd = self._map_fd(name)
        try:
            mm = mmap.mmap(fd, _map_len(value_size, entries), mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as exc:
            raise LoadError("mmap", f"map {name}", exc.errno or 0, "") from exc
        self._maps.append(mm)
        return mm

    @property
    def hooks(self) -> tuple[str, ...]:
        return tuple(self._links)

    @property
    def tracks_inactive_file(self) -> bool:
        return "memcg_lruvec" in self._links

    # -- watched cgroups ----------------------------------------------------------------
    def register(self, cgroup: MemoryCgroup, rule: Rule) -> SlotFlag:
        with self._lock:
            if self._closed:
                raise RtmlError("the eBPF runtime is closed")
            cgid = cgroup.cgroup_id
            state = self._slots_by_cgid.get(cgid)
            fresh = state is None
            if state is None:
                used = {s.index for s in self._slots_by_cgid.values()}
                free = next((i for i in range(_abi.MAX_SLOTS) if i not in used), None)
                if free is None:
                    raise RtmlError(f"all {_abi.MAX_SLOTS} eBPF slots are in use; close Limiters you no longer need")
                state = _SlotState(free, cgroup, cgid, PollBackend(cgroup, "file reader"),
                                   ancestors=cgroup.ancestors())
            rule_index = next((i for i in range(_abi.MAX_RULES) if i not in state.rules), None)
            if rule_index is None:
                raise RtmlError(
                    f"cgroup {cgroup.directory} already has {_abi.MAX_RULES} thresholds watched in this "
                    "process; share a Limiter instead of creating more"
                )
            snap = state.reader.read()
            tripped = evaluate(rule, Usage(snap.used, snap.working_set, snap.limit), False)
            if fresh:
                self._init_slot(state, cgroup, snap)
            self._slots_mm[state.index * SLOT_SIZE + _abi.TRIPPED_OFFSET + rule_index] = int(tripped)
            self._write_rule(state.index, rule_index, rule)
            state.rules[rule_index] = rule
            if fresh:
                key = ctypes.c_uint64(cgid)
                value = ctypes.c_uint32(state.index)
                _libbpf.check(
                    _libbpf.lib().bpf_map_update_elem(self._watch_fd, ctypes.byref(key), ctypes.byref(value), 0),
                    "watch", cgroup.directory,
                )
                self._slots_by_cgid[cgid] = state
                self._update_ctl()
            off = state.index * SLOT_SIZE + _abi.TRIPPED_OFFSET + rule_index
            return SlotFlag(state.index, rule_index, self._slots_view[off : off + 1])

    @property
    def inherited(self) -> bool:
        """True in a child forked after the load (gunicorn --preload, multiprocessing fork)."""
        return os.getpid() != self._pid

    def unregister(self, flag: SlotFlag) -> None:
        with self._lock:
            if self._closed or self.inherited:
                # The kernel state belongs to the process that loaded it: a forked child that
                # closes its copy must not unwatch the cgroup for its parent and siblings.
                return
            state = next((s for s in self._slots_by_cgid.values() if s.index == flag.slot), None)
            if state is None or flag.rule not in state.rules:
                return
            del state.rules[flag.rule]
            self._write_rule(state.index, flag.rule, None)
            if not state.rules:
                del self._slots_by_cgid[state.cgroup_id]
                key = ctypes.c_uint64(state.cgroup_id)
                _libbpf.lib().bpf_map_delete_elem(self._watch_fd, ctypes.byref(key))
                self._update_ctl()

    def _state_of(self, cgroup: MemoryCgroup) -> _SlotState | None:
        return next((st for st in self._slots_by_cgid.values() if st.cgroup.directory == cgroup.directory), None)

    def _init_slot(self, state: _SlotState, cgroup: MemoryCgroup, snap: Snapshot) -> None:
        slot = _abi.Slot()
        slot.cgroup_id = cgroup.cgroup_id
        slot.level = cgroup.depth
        slot.usage_pages = snap.usage // PAGE_SIZE
        slot.limit_pages = (snap.limit // PAGE_SIZE) if snap.limit is not None else _abi.UNLIMITED_PAGES
        slot.headroom_pages = (snap.headroom // PAGE_SIZE) if snap.headroom is not None else _abi.UNLIMITED_PAGES
        slot.updated_ns = time.monotonic_ns()
        base = state.index * SLOT_SIZE
        self._slots_mm[base : base + SLOT_SIZE] = bytes(slot)
        zeros = (_abi.Counters * possible_cpus())()  # a reused slot starts from zero
        key = ctypes.c_uint32(state.index)
        _libbpf.check(_libbpf.lib().bpf_map_update_elem(self._counters_fd, ctypes.byref(key), zeros, 0),
                      "reset", "counters")
        cfg = _abi.Config()
        cfg.cgroup_id = cgroup.cgroup_id
        cfg.inactive_file_base = snap.inactive_file // PAGE_SIZE
        cbase = state.index * CONFIG_SIZE
        self._configs_mm[cbase : cbase + CONFIG_SIZE] = bytes(cfg)

    def _write_rule(self, slot: int, index: int, rule: Rule | None) -> None:
        off = slot * CONFIG_SIZE + _abi.Config.rules.offset + index * RULE_SIZE
        r = _abi.Rule.from_buffer(self._configs_mm, off)
        r.kind = _abi.RULE_OFF  # off while the values change
        if rule is None:
            return
        r.metric = _abi.METRIC_WORKING_SET if rule.metric == "working_set" else _abi.METRIC_USAGE
        if rule.trip.nbytes is not None:
            r.trip = rule.trip.nbytes // PAGE_SIZE
            r.clear = (rule.clear.nbytes or 0) // PAGE_SIZE
            kind = _abi.RULE_PAGES
        else:
            r.trip = rule.trip.ppm or 0
            r.clear = rule.clear.ppm or 0
            kind = _abi.RULE_FRACTION
        r.kind = kind
        del r

    def _update_ctl(self) -> None:
        ctl = _abi.Ctl.from_buffer(self._ctl_mm)
        states = list(self._slots_by_cgid.values())
        ctl.min_level = min((s.cgroup.depth for s in states), default=0)
        ctl.nwatched = len(states)
        ctl.gen = (ctl.gen + 1) & 0xFFFFFFFF  # after the watch map changed: drops the programs' caches
        del ctl

    # -- upkeep without memcg events ----------------------------------------------------
    MAINTAIN_INTERVAL = 0.25

    @property
    def needs_upkeep(self) -> bool:
        """True where only the fault hook feeds the slots (kernels before 6.13)."""
        return not self.tracks_inactive_file

    def maintain(self, cgroup: MemoryCgroup) -> None:
        """Fault-hook kernels only: the program sees growth as it faults in, but not frees nor
        inactive_file. Re-read both from the cgroup files and re-evaluate the verdicts, so a
        cgroup that freed memory (or whose cache went inactive) clears without waiting for its
        next fault. Called by the limiter monitor every MAINTAIN_INTERVAL."""
        with self._lock:
            state = self._state_of(cgroup)
            if state is None or self._closed:
                return
            snap = state.reader.read()
            cfg = _abi.Config.from_buffer(self._configs_mm, state.index * CONFIG_SIZE)
            cfg.inactive_file_base = snap.inactive_file // PAGE_SIZE
            del cfg
            usage = Usage(snap.used, snap.working_set, snap.limit)
            base = state.index * SLOT_SIZE + _abi.TRIPPED_OFFSET
            for index, rule in state.rules.items():
                was = bool(self._slots_mm[base + index])
                now = evaluate(rule, usage, was)
                if now != was:
                    self._slots_mm[base + index] = int(now)

    # -- readings -----------------------------------------------------------------------
    def read_slot(self, index: int) -> _abi.Slot:
        """A consistent copy of one slot (retries while a writer is in the middle)."""
        base = index * SLOT_SIZE
        raw = b""
        for _ in range(100):
            end_before = _U64.unpack_from(self._slots_mm, base + _abi.SEQ_END_OFFSET)[0]
            raw = self._slots_mm[base : base + SLOT_SIZE]
            begin_after = _U64.unpack_from(self._slots_mm, base + _abi.SEQ_BEGIN_OFFSET)[0]
            if begin_after == end_before:
                break
        return _abi.Slot.from_buffer_copy(raw)

    def snapshot(self, cgroup: MemoryCgroup, full: bool = True) -> Snapshot:
        state = self._state_of(cgroup)
        if state is None:
            raise RtmlError(f"cgroup {cgroup.directory} is not watched")
        s = self.read_slot(state.index)
        c = self.read_counters(state.index) if full else _abi.Counters()
        cfg = _abi.Config.from_buffer_copy(
            self._configs_mm[state.index * CONFIG_SIZE : (state.index + 1) * CONFIG_SIZE]
        )
        if full and not self.tracks_inactive_file:
            # Without lruvec events the kernel side cannot follow inactive_file: refresh the base.
            try:
                base_pages = cgroup.read_inactive_file() // PAGE_SIZE
                live_cfg = _abi.Config.from_buffer(self._configs_mm, state.index * CONFIG_SIZE)
                live_cfg.inactive_file_base = base_pages
                del live_cfg
                cfg.inactive_file_base = base_pages
            except OSError:
                pass
        limit = s.limit_pages * PAGE_SIZE if s.limit_pages < _abi.UNLIMITED_PAGES else None
        headroom = s.headroom_pages * PAGE_SIZE if limit is not None else None
        usage = s.usage_pages * PAGE_SIZE
        depth = int(s.limit_depth)
        source = None
        if limit is not None:
            source = state.ancestors[depth] if depth < len(state.ancestors) else (
                f"(an ancestor {depth} levels up, above the cgroup mount root)"
            )
        inactive = max(0, (cfg.inactive_file_base + s.inactive_file_delta) * PAGE_SIZE)
        return Snapshot(
            usage=usage,
            used=effective_used(usage, limit, headroom),
            inactive_file=inactive,
            limit=limit,
            limit_source=source,
            headroom=headroom,
            updated_ns=int(s.updated_ns),
            oom_kills=int(s.oom_kills) if "oom_victim" in self._links else _file_oom_kills(cgroup),
            faults=c.faults if "page_fault_user" in self._links else None,
            events=c.events,
            growth={
                k: (int(getattr(c, f"{k}_charged")) * PAGE_SIZE, int(getattr(c, f"{k}_uncharged")) * PAGE_SIZE)
                for k in _abi.GROWTH_KINDS
            },
        )

    def read_counters(self, index: int) -> _abi.Counters:
        """The per-CPU counters of one slot, summed."""
        ncpu = possible_cpus()
        values = (_abi.Counters * ncpu)()
        key = ctypes.c_uint32(index)
        _libbpf.check(
            _libbpf.lib().bpf_map_lookup_elem(self._counters_fd, ctypes.byref(key), values), "read", "counters"
        )
        total = _abi.Counters()
        for field_spec in _abi.Counters._fields_:
            name = field_spec[0]
            setattr(total, name, sum(getattr(v, name) for v in values))
        return total

    # -- teardown -----------------------------------------------------------------------
    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.inherited:
            # Forked copy: leave links and maps to the loading process (fds close at exit).
            self._links.clear()
            self._maps.clear()
            self._obj = 0
            return
        lib = _libbpf._lib
        for link in reversed(list(self._links.values())):
            lib.bpf_link__destroy(link)
        self._links.clear()
        self._slots_view = None  # type: ignore[assignment]
        for mm in reversed(self._maps):
            try:
                mm.close()
            except BufferError:
                pass  # a Limiter's view still points into it: it unmaps when that view is collected
        self._maps.clear()
        if self._obj:
            lib.bpf_object__close(self._obj)
            self._obj = 0
