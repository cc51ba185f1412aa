"""The per-process owner of the loaded object, shared by every Limiter: references, locking,
fork, and the Watch handles the hot path reads.

One Runtime per process (``Runtime.acquire``), refcounted: the backend of each eBPF Limiter
holds one reference, and each active Watch another. When the last goes, the programs are
detached and the maps closed. A forked child never tears down what its parent loaded, and a
child forked while another thread held a lock starts with fresh locks.
"""

from __future__ import annotations

import os
import threading
from typing import Any

from .._cgroup import MemoryCgroup
from .._rules import Rule
from ..backends.meter import EbpfThreadMeter
from ..config import env_hooks
from ..errors import RtmlError
from ..snapshot import Snapshot
from . import abi
from .hooks import MEMCG_LRUVEC
from .loader import Loaded, load, meter_on
from .slots import Slots
from .wake import WakeHub, Waker, WakeRing


class Watch:
    """One rule of one watched cgroup: ``hot[0]`` is the kernel's verdict byte.

    It holds a reference on the runtime until closed; when it is collected (its Limiter and
    every kept ``is_mem_limit_reached`` are gone) its rule index is freed. Nothing here refers
    back to the Limiter, so plain reference counting frees it.
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
    _instance: Runtime | None = None
    _class_lock = threading.Lock()

    # -- sharing ---------------------------------------------------------------------------
    @classmethod
    def acquire(cls) -> Runtime:
        with cls._class_lock:
            while True:
                inst = cls._instance
                if inst is None or inst._closed or inst.inherited:
                    # A forked child builds its own: the inherited one belongs to its parent.
                    inst = cls._instance = cls(env_hooks())
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
        self._forget_instance()

    def drop_ref(self) -> None:
        """release(), but never blocking (for finalizers)."""
        self._pending.append((-1, -1, 0))
        if self._lock.acquire(blocking=False):
            self._drain_and_unlock()

    @classmethod
    def current(cls) -> Runtime | None:
        inst = cls._instance
        return inst if inst is not None and not inst._closed else None

    def _forget_instance(self) -> None:
        if Runtime._instance is self:
            Runtime._instance = None

    @classmethod
    def _after_fork_in_child(cls) -> None:
        # A fork while another thread held a lock (a background load holds the class lock for
        # ~150 ms) must not leave the child waiting for a thread that does not exist there.
        cls._class_lock = threading.Lock()
        inst = cls._instance
        if inst is not None:
            inst._lock = threading.Lock()
            inst._pending.clear()

    @property
    def inherited(self) -> bool:
        """True in a child forked after the load (gunicorn --preload, multiprocessing fork)."""
        return os.getpid() != self._pid

    # -- load ------------------------------------------------------------------------------
    def __init__(self, hooks: tuple[str, ...] | None = None) -> None:
        self._refs = 0
        self._closed = False
        self._pid = os.getpid()
        self._lock = threading.Lock()
        # (slot, rule, cgroup id) of Watches collected while the lock was held; (-1, -1, 0) or a
        # negative cgroup id: a reference to give back too.
        self._pending: list[tuple[int, int, int]] = []
        self._loaded: Loaded = load(hooks)
        self._wake: WakeHub | None = None  # made for the first enforcer that asks
        try:
            self._slots = Slots(self._loaded)
            self.thread_meter: EbpfThreadMeter | None = EbpfThreadMeter(
                memoryview(self._loaded.maps["threads"]).cast("q"), abi.MAX_THREADS, self)
        except BaseException:
            self._loaded.close()
            raise

    @property
    def hooks(self) -> tuple[str, ...]:
        return self._loaded.hooks

    @property
    def skipped(self) -> dict[str, str]:
        return self._loaded.skipped

    @property
    def prog_ids(self) -> dict[str, int]:
        return self._loaded.prog_ids

    @property
    def tracks_inactive_file(self) -> bool:
        return MEMCG_LRUVEC in self._loaded.links

    @property
    def needs_upkeep(self) -> bool:
        """True where no memcg events feed the slots (kernels before 6.13, the lean set)."""
        return not self.tracks_inactive_file

    MAINTAIN_INTERVAL = 0.25
    LIMIT_CHECK_INTERVAL = 1.0

    # -- locking -------------------------------------------------------------------------------
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

    def _open_slots(self) -> Slots:
        if self._closed:
            raise RtmlError("the eBPF runtime is closed")
        return self._slots

    # -- watches -------------------------------------------------------------------------------
    def register(self, cgroup: MemoryCgroup, rule: Rule) -> Watch:
        with self._locked():
            slot, rule_index, view = self._open_slots().register(cgroup, rule)
            self._refs += 1  # the Watch's own reference, released at close or collection
            return Watch(self, slot, rule_index, cgroup.cgroup_id, view)

    def unregister(self, watch: Watch, fail_answer: bool) -> None:
        with self._locked():
            self._pending.append((-1, -1, 0))  # the Watch's reference, released on the way out
            if self._closed or self.inherited:
                # The kernel state belongs to the process that loaded it: a forked child that
                # closes its copy must not unwatch the cgroup for its parent and siblings.
                return
            self._slots.close_rule(watch.slot, watch.rule, watch.cgroup_id, fail_answer)

    def forget(self, watch: Watch) -> None:
        """A Watch was collected: free its rule index (and the slot when nothing else holds it),
        and drop its runtime reference if close() did not. Never blocks: a collection that
        happens while this runtime's lock is held (by this thread or another) is finished by
        the holder."""
        self._pending.append((watch.slot, watch.rule, watch.cgroup_id if watch.closed else -watch.cgroup_id))
        if self._lock.acquire(blocking=False):
            self._drain_and_unlock()

    def _drain_and_unlock(self) -> None:
        released = 0
        try:
            while self._pending:
                slot, rule, cgid = self._pending.pop()
                if slot < 0 or cgid < 0:
                    released += 1
                    cgid = -cgid
                if self._closed or self.inherited or slot < 0:
                    continue
                self._slots.free_rule(slot, rule, cgid)
            self._refs -= released
            if released and self._refs <= 0:
                self._close_locked()
        finally:
            self._lock.release()
        if released and self._closed:
            self._forget_instance()

    # -- readings and upkeep -------------------------------------------------------------------
    def maintain(self, watch: Watch) -> None:
        with self._locked():
            if not self._closed and not self.inherited:
                self._slots.upkeep(watch.slot, watch.cgroup_id)

    def check_limit(self, watch: Watch) -> bool:
        with self._locked():
            if self._closed or self.inherited:
                return False
            return self._slots.check_limit(watch.slot, watch.cgroup_id)

    def read_slot(self, index: int) -> abi.Slot:
        with self._locked():
            return self._open_slots().read_slot(index)

    def trips(self, watch: Watch) -> int:
        with self._locked():
            slots = self._open_slots()
            slots.state(watch.slot, watch.cgroup_id)
            return int(slots.read_slot(watch.slot).trips[watch.rule])

    def room(self, watch: Watch, rule: Rule) -> tuple[int | None, int | None]:
        """Lock-free on purpose (admission calls it on every request): word reads of the slot."""
        return self._open_slots().room(watch.slot, rule)

    def snapshot(self, watch: Watch, full: bool = True) -> Snapshot:
        with self._locked():
            slots = self._open_slots()
            state = slots.state(watch.slot, watch.cgroup_id)
            return slots.snapshot(state, full=full,
                                  refresh_from_files=full and self.needs_upkeep and not self.inherited)

    def want_thread_meter(self) -> None:
        """A Limiter's thread_meter() was asked for: the programs start charging threads."""
        with self._locked():
            # a forked child too: the mapping is its parent's, and the meter is wanted there
            if not self._closed and "ctl" in self._loaded.maps:
                meter_on(self._loaded.maps["ctl"])

    # -- the enforcer's wake (wake.py) ---------------------------------------------------------
    def waker(self, cgroup_id: int, poll: float) -> Waker | None:
        """A handle on the kernel's wake for a cgroup this process watches, None where it cannot
        have one (not watched here, closed, or inherited from a parent: the level is one word
        per slot, which the parent and every sibling would overwrite)."""
        with self._locked():
            if self._closed or self.inherited or self.slot_of(cgroup_id) is None:
                return None
            if self._wake is None:
                assert self._slots.config_words is not None
                self._wake = WakeHub(WakeRing(self._loaded.fds["wake_events"]), self._slots.config_words)
            return Waker(self, self._wake, cgroup_id, poll)

    def slot_of(self, cgroup_id: int) -> int | None:
        """The slot watching ``cgroup_id`` now (lock-free: one dict read)."""
        state = self._slots.by_cgid.get(cgroup_id)
        return state.index if state is not None and state.watched and not self._closed else None

    def used_pages(self, slot: int) -> int:
        """Used pages as the rules see them, from the slot's words (no syscall)."""
        return int(self._open_slots()._used(slot)[0])

    # -- teardown --------------------------------------------------------------------------------
    def close(self) -> None:
        with self._lock:
            self._close_locked()
        self._forget_instance()

    def _close_locked(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.thread_meter = None
        if self._wake is not None and not self.inherited:
            self._wake.close()
        self._wake = None
        self._slots.release_views()
        self._loaded.close(inherited=self.inherited)


os.register_at_fork(after_in_child=Runtime._after_fork_in_child)
