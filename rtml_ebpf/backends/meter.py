"""Per-thread memory meters: what the kernel charged to the cgroup while one thread ran.

Three sources, the same contract (bytes, cumulative for the calling thread); the third,
``agent`` (an unprivileged client of the node agent: its cgroup's meter page), is in
agent_meter.py:

* ``ebpf``: the BPF programs add every memcg charge and uncharge made in the context of a
  registered thread to that thread's entry of the mmapped ``threads`` array (net pages and
  the peak of net pages). Exact for anon, file, kernel and socket charges, huge pages
  included; reads and the peak reset are memory accesses, no syscall. A thread registers
  once (it writes its tid into the entry at ``tid % RTML_MAX_THREADS``); a collision with
  another live thread leaves that thread on the rusage source.
* ``rusage``: the kernel's per-thread minor-fault count (``getrusage(RUSAGE_THREAD)``), one
  syscall per read, times the page size. Counts first touches, so it sees growth but not
  frees (net = peak), and a huge page counts as one page. Used where the programs are not
  ours to write (the poll backend), and for a thread the agent had no room for.
"""

from __future__ import annotations

import os
import resource
import threading
import weakref
from typing import Protocol

from ..config import PAGE_SIZE
from ..ebpf.abi import T_CHARGED, T_NET, T_PEAK, T_TID
from ..ebpf.abi import THREAD_WORDS as T_WORDS


class Meter(Protocol):
    @property
    def source(self) -> str:
        """What measures the threads: "ebpf", "agent", "rusage"; "ebpf+rusage" or
        "agent+rusage" while some live thread's measurement fell back to getrusage (the
        meter's stats() says why)."""
        ...

    def begin(self) -> int:
        """Start a measurement on the calling thread: resets its peak, returns its net bytes."""
        ...

    def read(self) -> tuple[int, int]:
        """(net bytes, peak net bytes since the last begin/reset) of the calling thread."""
        ...

    def reset_peak(self) -> None: ...

    def net_of(self, tid: int) -> int | None:
        """Net bytes of another thread of this process, or None when not readable cheaply."""
        ...


class RusageMeter:
    source = "rusage"

    def begin(self) -> int:
        return resource.getrusage(resource.RUSAGE_THREAD).ru_minflt * PAGE_SIZE

    def read(self) -> tuple[int, int]:
        v = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt * PAGE_SIZE
        return v, v

    def reset_peak(self) -> None:
        pass

    def net_of(self, tid: int) -> int | None:
        try:
            with open(f"/proc/self/task/{tid}/stat", "rb") as f:
                text = f.read()
        except OSError:
            return None
        return int(text[text.rfind(b")") + 2 :].split()[7]) * PAGE_SIZE


RUSAGE = RusageMeter()


class _Registration:
    """The calling thread's entry; clears it when the thread ends (its locals are dropped), in the
    process that registered it only: a forked child drops the parent's threads' locals too, and
    the mapping is shared, so clearing there would unregister the parent's live threads."""

    __slots__ = ("words", "base", "tid", "pid")

    def __init__(self, words: memoryview, base: int, tid: int) -> None:
        self.words, self.base, self.tid = words, base, tid
        self.pid = os.getpid()

    def __del__(self) -> None:
        try:
            if self.words[self.base + T_TID] == self.tid and os.getpid() == self.pid:
                self.words[self.base + T_TID] = 0
        except (ValueError, IndexError):
            pass  # the mapping is gone with its runtime


class EbpfThreadMeter:
    """Reads the ``threads`` array the programs keep (see bpf/rtml.h, struct rtml_thread)."""

    def __init__(self, words: memoryview, entries: int, owner: object) -> None:
        self._words = words  # int64 view of the mapping
        self._entries = entries
        self._owner = owner  # keeps the runtime (and so the mapping) alive
        self._local = threading.local()
        self._rusage: dict[int, int] = {}  # native tid -> the live thread holding its entry
        _meters.add(self)

    @property
    def source(self) -> str:
        """"ebpf", or "ebpf+rusage" while a live thread is on getrusage because another live
        thread holds its entry (``tid % entries``). Reads /proc: for stats, not the hot path."""
        self._prune()
        return "ebpf+rusage" if self._rusage else "ebpf"

    def _prune(self) -> None:
        for tid in list(self._rusage):
            if not os.path.exists(f"/proc/self/task/{tid}"):
                self._rusage.pop(tid, None)

    def stats(self) -> dict[str, object]:
        """``rusage_threads``: live threads measured by getrusage; ``rusage_why``: why."""
        source, held = self.source, dict(self._rusage)
        return {"source": source, "rusage_threads": len(held),
                "rusage_why": {f"thread {tid}: its entry is held by live thread {holder}": 1
                               for tid, holder in held.items()}}

    def _forked(self) -> None:
        # The thread that forked is a new thread in the child (another tid): its registration
        # names the parent's thread, whose entry it would keep reading. It registers afresh.
        self._local = threading.local()
        self._rusage = {}

    def _entry(self) -> int | None:
        """Word offset of the calling thread's entry, registering it on first use."""
        reg: _Registration | None | bool = getattr(self._local, "reg", False)
        if reg is not False:
            return reg.base if isinstance(reg, _Registration) else None
        tid = threading.get_native_id()
        base = (tid % self._entries) * T_WORDS
        holder = self._words[base + T_TID]
        if holder not in (0, tid) and os.path.exists(f"/proc/{holder}"):
            self._local.reg = None  # another live thread holds it: rusage for this one
            self._rusage[tid] = holder
            if len(self._rusage) > 1024:  # (threads come and go while nobody reads stats)
                self._prune()
            return None
        w = self._words
        if holder != tid:  # already ours: greenlets (gevent) share the thread, and its counters
            w[base + T_TID] = 0
            w[base + T_NET] = w[base + T_PEAK] = w[base + T_CHARGED] = 0
            w[base + T_TID] = tid
        self._local.reg = _Registration(w, base, tid)
        return base

    def begin(self) -> int:
        base = self._entry()
        if base is None:
            return RUSAGE.begin()
        w = self._words
        net = w[base + T_NET]
        w[base + T_PEAK] = net
        return net * PAGE_SIZE

    def read(self) -> tuple[int, int]:
        base = self._entry()
        if base is None:
            return RUSAGE.read()
        w = self._words
        return w[base + T_NET] * PAGE_SIZE, w[base + T_PEAK] * PAGE_SIZE

    def reset_peak(self) -> None:
        base = self._entry()
        if base is not None:
            self._words[base + T_PEAK] = self._words[base + T_NET]

    def net_of(self, tid: int) -> int | None:
        base = (tid % self._entries) * T_WORDS
        if self._words[base + T_TID] != tid:
            return RUSAGE.net_of(tid)
        return self._words[base + T_NET] * PAGE_SIZE


_meters: weakref.WeakSet[EbpfThreadMeter] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for meter in list(_meters):
        meter._forked()


os.register_at_fork(after_in_child=_after_fork_in_child)
