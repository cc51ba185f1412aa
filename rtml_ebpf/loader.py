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
from typing import Any

from . import _abi, _features, _libbpf
from ._backend import Snapshot
from ._cgroup import MemoryCgroup
from ._meter import EbpfThreadMeter
from ._poll import PollBackend
from ._rules import Rule, Usage, effective_used, evaluate
from .config import env_hooks
from .errors import CapacityError, LoadError, NotSupported, RtmlError

log = logging.getLogger("rtml_ebpf")

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
OBJECT_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bpf", "rtml.bpf.o")
SLOT_SIZE = ctypes.sizeof(_abi.Slot)
CONFIG_SIZE = ctypes.sizeof(_abi.Config)
RULE_SIZE = ctypes.sizeof(_abi.Rule)
_U64 = struct.Struct("=Q")


def hooks_from_env(value: str | None = None) -> tuple[str, ...] | None:
    """RTML_HOOKS (see config.parse_hooks); ``value`` overrides the environment."""
    return env_hooks(None if value is None else {"RTML_HOOKS": value})


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


# Watched cgroups on one path that a single event refreshes (RTML_NESTED_WATCHES in rtml.bpf.c).
NESTED_WATCHES = 2


@dataclass
class _SlotState:
    index: int
    cgroup: MemoryCgroup
    cgroup_id: int
    reader: PollBackend  # the cgroup's files, for the initial reading and the upkeep (caches limits)
    rules: dict[int, Rule] = field(default_factory=dict)
    # Rules closed while their Watch lives on (a caller kept the bound check): the byte keeps
    # the fail answer and the index is not lent again until that Watch is collected, so a
    # stale check can never answer for another cgroup.
    quarantined: dict[int, bool] = field(default_factory=dict)  # rule index -> its fail answer
    ancestors: list[str] = field(default_factory=list)
    watched: bool = True


class Watch:
    """One rule of one watched cgroup: ``hot[0]`` is the kernel's verdict byte.

    It holds a reference on the runtime; when it is collected (its Limiter and every kept
    ``is_mem_limit_reached`` are gone) the rule is unwatched and the runtime released.
    Nothing here refers back to the Limiter, so plain reference counting frees it.
    """

    __slots__ = ("runtime", "slot", "rule", "cgroup_id", "hot", "closed", "__weakref__")

    def __init__(self, runtime: Runtime, slot: int, rule: int, cgroup_id: int, view: memoryview) -> None:
        self.runtime = runtime
        self.slot = slot
        self.rule = rule
        self.cgroup_id = cgroup_id
        self.hot: Any = view.cast("?")
        self.closed = False

    def __getitem__(self, index: int) -> bool:
        return bool(self.hot[0])

    def close(self, fail_answer: bool) -> None:
        """Stop watching; the byte answers ``fail_answer`` from now on (kept checks read it)."""
        if not self.closed:
            self.closed = True
            self.runtime.unregister(self, fail_answer)

    def __del__(self) -> None:
        try:
            self.runtime.forget(self)
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


class Runtime:
    """The loaded object, its links and mappings. One per process, shared and refcounted."""

    _instance: Runtime | None = None
    _class_lock = threading.Lock()

    # -- sharing ------------------------------------------------------------------------
    @classmethod
    def acquire(cls) -> Runtime:
        with cls._class_lock:
            while True:
                inst = cls._instance
                if inst is None or inst._closed or inst.inherited:
                    # A forked child builds its own: the inherited one belongs to its parent.
                    inst = cls._instance = cls(hooks_from_env())
                with inst._lock:
                    if not inst._closed:
                        inst._refs += 1
                        return inst

    def release(self) -> None:
        with self._lock:
            self._refs -= 1
            if self._refs > 0:
                return
            self._close_locked()
        if Runtime._instance is self:
            Runtime._instance = None

    @classmethod
    def current(cls) -> Runtime | None:
        inst = cls._instance
        return inst if inst is not None and not inst._closed else None

    @classmethod
    def _after_fork_in_child(cls) -> None:
        # A fork while another thread held a lock (a background load holds the class lock for
        # ~150 ms) must not leave the child waiting for a thread that does not exist there.
        cls._class_lock = threading.Lock()
        inst = cls._instance
        if inst is not None:
            inst._lock = threading.Lock()
            inst._pending.clear()

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
        self._pending: list[tuple[int, int, int]] = []  # (slot, rule, cgroup_id) of Watches collected mid-lock
        self.thread_meter: EbpfThreadMeter | None = None
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
        self._slot_words = self._slots_view.cast("q")
        self._config_words = memoryview(self._configs_mm).cast("q")
        threads_mm = self._mmap("threads", ctypes.sizeof(_abi.Thread), _abi.MAX_THREADS)
        self.thread_meter = EbpfThreadMeter(memoryview(threads_mm).cast("q"), _abi.MAX_THREADS, self)
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
    def register(self, cgroup: MemoryCgroup, rule: Rule) -> Watch:
        with self._locked():
            if self._closed:
                raise RtmlError("the eBPF runtime is closed")
            cgid = cgroup.cgroup_id
            state = self._slots_by_cgid.get(cgid)
            fresh = state is None or not state.watched
            if state is None:
                self._check_nesting(cgroup)
                used = {s.index for s in self._slots_by_cgid.values()}
                free = next((i for i in range(_abi.MAX_SLOTS) if i not in used), None)
                if free is None:
                    raise CapacityError(
                        f"all {_abi.MAX_SLOTS} eBPF slots are in use; close Limiters you no longer need"
                    )
                state = _SlotState(free, cgroup, cgid, PollBackend(cgroup, "file reader"),
                                   ancestors=cgroup.ancestors())
            elif not state.watched:
                self._check_nesting(cgroup)
            taken = set(state.rules) | set(state.quarantined)
            rule_index = next((i for i in range(_abi.MAX_RULES) if i not in taken), None)
            if rule_index is None:
                raise CapacityError(
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
                state.watched = True
                self._slots_by_cgid[cgid] = state
                self._update_ctl()
            off = state.index * SLOT_SIZE + _abi.TRIPPED_OFFSET + rule_index
            self._refs += 1  # the Watch's own reference, released when it is collected
            return Watch(self, state.index, rule_index, cgid, self._slots_view[off : off + 1])

    def _check_nesting(self, cgroup: MemoryCgroup) -> None:
        """The programs refresh at most NESTED_WATCHES watched cgroups on one path: refuse a
        third rather than leave one of them silently stale."""
        new = os.path.normpath(cgroup.directory)

        def on_path(a: str, b: str) -> bool:  # a is b or an ancestor of b
            return a == b or b.startswith(a + os.sep)

        others = [os.path.normpath(s.cgroup.directory) for s in self._slots_by_cgid.values() if s.watched]
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

    @property
    def inherited(self) -> bool:
        """True in a child forked after the load (gunicorn --preload, multiprocessing fork)."""
        return os.getpid() != self._pid

    def unregister(self, watch: Watch, fail_answer: bool) -> None:
        """A Limiter closed: its rule stops, its byte answers ``fail_answer`` while kept checks
        live (quarantined), the cgroup is unwatched when it has no rule left, and the Watch's
        runtime reference goes (a kept check holds its byte, not the programs)."""
        with self._locked():
            self._pending.append((-1, -1, 0))  # the Watch's reference, released on the way out
            if self._closed or self.inherited:
                # The kernel state belongs to the process that loaded it: a forked child that
                # closes its copy must not unwatch the cgroup for its parent and siblings.
                return
            state = self._slots_by_cgid.get(watch.cgroup_id)
            if state is None or state.index != watch.slot or watch.rule not in state.rules:
                return
            del state.rules[watch.rule]
            self._write_rule(state.index, watch.rule, None)
            self._slots_mm[state.index * SLOT_SIZE + _abi.TRIPPED_OFFSET + watch.rule] = int(fail_answer)
            state.quarantined[watch.rule] = fail_answer
            if not state.rules and state.watched:
                state.watched = False
                key = ctypes.c_uint64(state.cgroup_id)
                _libbpf.lib().bpf_map_delete_elem(self._watch_fd, ctypes.byref(key))
                self._update_ctl()

    def forget(self, watch: Watch) -> None:
        """A Watch was collected: free its rule index (and the slot when nothing else holds it),
        and drop its runtime reference if close() did not. Never blocks: a collection that
        happens while this runtime's lock is held (by this thread or another) is finished by
        the holder."""
        self._pending.append((watch.slot, watch.rule, watch.cgroup_id if watch.closed else -watch.cgroup_id))
        if self._lock.acquire(blocking=False):
            self._drain_and_unlock()

    def drop_ref(self) -> None:
        """release(), but never blocking (for finalizers)."""
        self._pending.append((-1, -1, 0))
        if self._lock.acquire(blocking=False):
            self._drain_and_unlock()

    def _drain_and_unlock(self) -> None:
        released = 0
        try:
            while self._pending:
                slot, rule, cgid = self._pending.pop()
                if slot < 0 or cgid < 0:  # a reference to give back (a release, an unclosed Watch)
                    released += 1
                    cgid = -cgid
                if self._closed or self.inherited or slot < 0:
                    continue
                state = self._slots_by_cgid.get(cgid)
                if state is None or state.index != slot:
                    continue
                if rule in state.rules:  # its Limiter was dropped without close()
                    del state.rules[rule]
                    self._write_rule(slot, rule, None)
                state.quarantined.pop(rule, None)
                if not state.rules and state.watched:
                    state.watched = False
                    key = ctypes.c_uint64(cgid)
                    _libbpf.lib().bpf_map_delete_elem(self._watch_fd, ctypes.byref(key))
                    self._update_ctl()
                if not state.rules and not state.quarantined:
                    del self._slots_by_cgid[cgid]
            self._refs -= released
            if released and self._refs <= 0:
                self._close_locked()
        finally:
            self._lock.release()
        if released and self._closed and Runtime._instance is self:
            Runtime._instance = None

    class _Locked:
        def __init__(self, rt: Runtime) -> None:
            self.rt = rt

        def __enter__(self) -> None:
            self.rt._lock.acquire()

        def __exit__(self, *exc: object) -> None:
            self.rt._drain_and_unlock()

    def _locked(self) -> Runtime._Locked:
        """The runtime lock; on the way out it finishes Watches collected meanwhile."""
        return Runtime._Locked(self)

    def _init_slot(self, state: _SlotState, cgroup: MemoryCgroup, snap: Snapshot) -> None:
        slot = _abi.Slot()
        slot.cgroup_id = cgroup.cgroup_id
        slot.level = cgroup.depth
        slot.usage_pages = snap.usage // PAGE_SIZE
        slot.limit_pages = (snap.limit // PAGE_SIZE) if snap.limit is not None else _abi.UNLIMITED_PAGES
        slot.headroom_pages = (snap.headroom // PAGE_SIZE) if snap.headroom is not None else _abi.UNLIMITED_PAGES
        slot.updated_ns = time.monotonic_ns()
        for rule, fail_answer in state.quarantined.items():
            slot.tripped[rule] = int(fail_answer)  # kept checks of closed Limiters keep their answer
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
        """True where no memcg events feed the slots (kernels before 6.13, the lean set)."""
        return not self.tracks_inactive_file

    def _state(self, watch: Watch) -> _SlotState:
        state = self._slots_by_cgid.get(watch.cgroup_id)
        if self._closed or state is None or state.index != watch.slot:
            raise RtmlError("this Limiter is closed: its eBPF watch is gone")
        return state

    def maintain(self, watch: Watch) -> None:
        """Without memcg events the program sees growth as it faults in, but not frees nor
        inactive_file. Re-read both from the cgroup files, rewrite the slot's usage and
        re-evaluate the verdicts, so a cgroup that freed memory (or whose cache went inactive)
        clears without waiting for its next fault. Called by the limiter monitor every
        MAINTAIN_INTERVAL."""
        with self._locked():
            if self._closed or self.inherited:
                return
            state = self._slots_by_cgid.get(watch.cgroup_id)
            if state is None or not state.watched:
                return
            snap = state.reader.read()
            self._write_reading(state, snap)

    LIMIT_CHECK_INTERVAL = 1.0

    def check_limit(self, watch: Watch) -> bool:
        """memcg-event kernels: a limit written while the cgroup is idle moves no counter, so
        the programs see it only at the next charge. Compare the files' effective limit with
        the slot's and rewrite the reading when they differ. True when it did."""
        with self._locked():
            if self._closed or self.inherited:
                return False
            state = self._slots_by_cgid.get(watch.cgroup_id)
            if state is None or not state.watched:
                return False
            limits = state.cgroup.effective_limit()
            pages = limits.limit_bytes // PAGE_SIZE if limits.limit_bytes is not None else _abi.UNLIMITED_PAGES
            if pages == self._slot_words[state.index * _abi.SLOT_WORDS + _abi.W_LIMIT]:
                return False
            self._write_reading(state, state.reader.read_now())
            return True

    def _write_reading(self, state: _SlotState, snap: Snapshot) -> None:
        """User space's reading into the slot (fault-hook kernels only), and the verdicts."""
        cfg = _abi.Config.from_buffer(self._configs_mm, state.index * CONFIG_SIZE)
        cfg.inactive_file_base = snap.inactive_file // PAGE_SIZE
        del cfg
        base = state.index * SLOT_SIZE
        slot = _abi.Slot.from_buffer(self._slots_mm, base)
        slot.inactive_file_delta = 0
        slot.usage_pages = snap.usage // PAGE_SIZE
        slot.limit_pages = snap.limit // PAGE_SIZE if snap.limit is not None else _abi.UNLIMITED_PAGES
        slot.headroom_pages = snap.headroom // PAGE_SIZE if snap.headroom is not None else _abi.UNLIMITED_PAGES
        slot.updated_ns = time.monotonic_ns()
        usage = Usage(snap.used, snap.working_set, snap.limit)
        for index, rule in state.rules.items():
            was = bool(slot.tripped[index])
            now = evaluate(rule, usage, was)
            if now != was:
                slot.tripped[index] = int(now)
                if now:
                    slot.trips[index] += 1
        del slot

    # -- readings -----------------------------------------------------------------------
    def read_slot(self, index: int) -> _abi.Slot:
        """A consistent copy of one slot (retries while a writer is in the middle)."""
        with self._locked():
            if self._closed:
                raise RtmlError("the eBPF runtime is closed")
            return self._read_slot(index)

    def _read_slot(self, index: int) -> _abi.Slot:
        base = index * SLOT_SIZE
        raw = b""
        for _ in range(100):
            end_before = _U64.unpack_from(self._slots_mm, base + _abi.SEQ_END_OFFSET)[0]
            raw = self._slots_mm[base : base + SLOT_SIZE]
            begin_after = _U64.unpack_from(self._slots_mm, base + _abi.SEQ_BEGIN_OFFSET)[0]
            if begin_after == end_before:
                break
        return _abi.Slot.from_buffer_copy(raw)

    def trips(self, watch: Watch) -> int:
        with self._locked():
            self._state(watch)
            return int(self._read_slot(watch.slot).trips[watch.rule])

    def room(self, watch: Watch, rule: Rule) -> tuple[int | None, int | None]:
        """(bytes before ``rule`` trips, bytes before the OOM killer acts) from the slot: a few
        word reads, no syscall, no lock (for admission on every request). None: unlimited."""
        w = self._slot_words
        base = watch.slot * _abi.SLOT_WORDS
        usage, limit, headroom = w[base + _abi.W_USAGE], w[base + _abi.W_LIMIT], w[base + _abi.W_HEADROOM]
        if limit >= _abi.UNLIMITED_PAGES:
            used, limit_bytes, limit_room = usage, None, None
        else:
            used, limit_bytes, limit_room = limit - headroom, limit * PAGE_SIZE, headroom * PAGE_SIZE
        if rule.metric == "working_set":
            inactive = self._config_words[watch.slot * _abi.CONFIG_WORDS + 1] + w[base + _abi.W_INACTIVE_DELTA]
            used = max(0, used - inactive)
        trip = rule.trip.resolve(limit_bytes)
        return (None if trip is None else trip - used * PAGE_SIZE), limit_room

    def snapshot(self, watch: Watch, full: bool = True) -> Snapshot:
        with self._locked():
            state = self._state(watch)
            s = self._read_slot(state.index)
            c = self._read_counters(state.index) if full else _abi.Counters()
            if full and not self.tracks_inactive_file and not self.inherited:
                # Without memcg events the slot cannot see frees nor inactive_file: the files
                # are the truth. Re-read them and refresh the slot (and its verdicts) with them.
                try:
                    self._write_reading(state, state.reader.read())
                except FileNotFoundError:
                    pass
                s = self._read_slot(state.index)
            cfg = _abi.Config.from_buffer_copy(
                self._configs_mm[state.index * CONFIG_SIZE : (state.index + 1) * CONFIG_SIZE]
            )
            oom_victim = "oom_victim" in self._links
            faults = "page_fault_user" in self._links
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
            oom_kills=int(s.oom_kills) if oom_victim else _file_oom_kills(state.cgroup),
            faults=c.faults if faults else None,
            events=c.events,
            growth={
                k: (int(getattr(c, f"{k}_charged")) * PAGE_SIZE, int(getattr(c, f"{k}_uncharged")) * PAGE_SIZE)
                for k in _abi.GROWTH_KINDS
            },
        )

    def read_counters(self, index: int) -> _abi.Counters:
        with self._locked():
            if self._closed:
                raise RtmlError("the eBPF runtime is closed")
            return self._read_counters(index)

    def _read_counters(self, index: int) -> _abi.Counters:
        """The per-CPU counters of one slot, summed. Under the lock: the map fd stays ours."""
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
        with self._lock:
            self._close_locked()
        if Runtime._instance is self:
            Runtime._instance = None

    def _close_locked(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.thread_meter = None
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
        self._slot_words = self._config_words = None  # type: ignore[assignment]
        for mm in reversed(self._maps):
            try:
                mm.close()
            except BufferError:
                pass  # a view still points into it (a kept check): it unmaps when that view is collected
        self._maps.clear()
        if self._obj:
            lib.bpf_object__close(self._obj)
            self._obj = 0


os.register_at_fork(after_in_child=Runtime._after_fork_in_child)
