"""The kernel's per-thread meter for an unprivileged client of the node agent (source "agent").

The agent lends this process's cgroup a meter page (frozen: mapped read-only here, written by
the programs only) and a begin page (read-write here). A thread asks the agent for an entry
once, by a ``meter`` round trip on a lease's connection (agent/meter_op.py); from then on
reads are memory reads. The peak is reset without writing kernel-fed state: begin() bumps the
entry's number in the begin page, and the programs restart the entry's peak from its net at
the thread's next charge. So read() gives (net, peak since begin): the peak when the entry's
number is ours, else the net (no charge since begin, so none above it).

A thread registers in begin()/reset_peak() only (where a measurement starts, so one
measurement never mixes sources); a thread the agent has no room for, or one asking faster
than the agent's request rate allows, is measured by getrusage until a later begin().

A forked process (a pre-fork server's worker, a multiprocessing child) may not ask on its
parent's connections: it asks on a connection of its own (agent_own.py); refused (the agent's
caps), it measures with getrusage and says why in stats()["fallback"].

``source`` says what measures this process's threads now: "agent" while every thread measured
since the last look was measured by the agent's pages, "agent+rusage" when one or more fell back
to getrusage (stats()["rusage_threads"] and ["rusage_why"] say how many and why), "rusage" when
the agent refused the meter altogether (stats()["off"]).
"""

from __future__ import annotations

import array
import logging
import mmap
import os
import select
import socket
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

from ..agent import protocol
from ..config import PAGE_SIZE
from ..ebpf import abi
from .agent_own import Connect, _own_for
from .meter import RUSAGE

log = logging.getLogger("rtml_ebpf")
ASKS_PER_SECOND = 8  # the agent fails a connection past 20 requests a second: stay well under
RETRY_FULL = 30.0  # seconds before a thread refused for room asks again
TIMEOUT = 1.0
_GEN_MASK = 0xFFFFFFFF
MAX_RUSAGE_TIDS = 1024  # threads on getrusage kept with their reason before the ended ones are dropped

LiveSocket = Callable[[], "tuple[socket.socket, threading.Lock] | None"]


def lease_socket(backend: Any) -> tuple[socket.socket, threading.Lock] | None:
    """The connection of a live lease of an AgentBackend, for the round trips."""
    if backend.lost:
        return None
    for lease in backend._leases:
        if not lease.retired and lease.sock is not None:
            return lease.sock, backend._sock_lock
    return None


_SHARED: dict[tuple[str, int], AgentThreadMeter] = {}
_SHARED_MU = threading.Lock()
_METERS: weakref.WeakSet[AgentThreadMeter] = weakref.WeakSet()
def shared_meter(backend: Any, connect: Connect | None = None) -> AgentThreadMeter:
    """One meter per process, agent socket and cgroup, whatever the number of Limiters: the agent
    keeps one entry per thread (the last connection to ask gets it), so two meters asking for the
    same thread would take it from each other. Each backend is a source of live connections,
    held weakly (a closed Limiter's goes with it). A forked process keeps the meter it inherited
    (the fork hook makes it the child's), so a Limiter it builds shares it too. ``connect``
    opens a forked process's own connection (backends/agent.py's _request)."""
    key = (backend.path, backend._cgid)
    ref = weakref.ref(backend)
    with _SHARED_MU:
        meter = _SHARED.get(key)
        if meter is None or meter.pid != os.getpid():
            meter = _SHARED[key] = AgentThreadMeter(lambda: None, connect, key)
        meter.add_source(ref, getattr(backend, "pid", os.getpid()))
        return meter


def ask_meter(sock: socket.socket, lock: threading.Lock, tid: int) -> tuple[dict[str, Any] | None, list[int]]:
    """One ``meter`` round trip on a lease's socket (which stays non-blocking: see
    agent_maps.ask_stats): the reply (None when there was none) and the fds passed with it."""
    if not lock.acquire(timeout=2 * TIMEOUT):
        return None, []
    fds: list[int] = []
    try:
        try:
            while True:  # drop anything unread; b"": the agent closed the connection
                try:
                    if not sock.recv(protocol.MAX_MESSAGE, socket.MSG_DONTWAIT):
                        return None, []
                except BlockingIOError:
                    break
            sock.send(protocol.encode({"v": protocol.VERSION, "op": "meter", "tid": tid}))
            if not select.select([sock], [], [], TIMEOUT)[0]:
                return None, []
            data, anc, _, _ = sock.recvmsg(protocol.MAX_MESSAGE, socket.CMSG_SPACE(2 * 4), socket.MSG_DONTWAIT)
            for level, kind, payload in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds.extend(array.array("i", payload[: len(payload) - len(payload) % 4]))
            reply = protocol.decode(data) if data else None
            return (reply if isinstance(reply, dict) else None), fds
        except Exception:  # noqa: BLE001 - no meter is a reading from getrusage, never an error
            return None, fds
    finally:
        lock.release()


class _Reg:
    """A thread's entry, in one era (one set of pages): entry index and allocation number."""

    __slots__ = ("era", "entry", "gen", "retry_at")

    def __init__(self, era: int, entry: int, gen: int, retry_at: float = 0.0) -> None:
        self.era, self.entry, self.gen, self.retry_at = era, entry, gen, retry_at


class AgentThreadMeter:
    """The Meter protocol (backends/meter.py) over the pages the agent lent this cgroup."""

    def __init__(self, live: LiveSocket, connect: Connect | None = None, key: tuple[str, int] | None = None) -> None:
        self._first = live  # the socket of a live lease (and its lock), or None
        # AgentBackends (shared_meter), asked after it, with the pid that made each: a lease of an
        # earlier process (we were forked) is only a template for a connection of our own
        self._sources: list[tuple[weakref.ref[Any], int]] = []
        self.pid = self._first_pid = os.getpid()  # a forked child must not ask on its parent's connections
        self._key = key  # (agent socket, cgroup id): a forked process's own connection is shared by key
        self._own = _own_for(key, connect)
        _METERS.add(self)
        self._mu = threading.Lock()
        self._local = threading.local()
        self._era = 0
        self._sock: socket.socket | None = None  # the connection the current pages came on
        self._page: mmap.mmap | None = None
        self._words: memoryview | None = None  # meter page, int64 words (read-only)
        self._begins: memoryview | None = None  # begin page, uint64 words (ours)
        self._begin_map: mmap.mmap | None = None
        self._asks: list[float] = []
        self._by_tid: dict[int, _Reg] = {}  # native tid -> its entry, for net_of
        self._ask_mu = threading.Lock()  # one ask at a time: the pages come with the first reply
        self._quiet_era = -1  # an era whose connection did not answer: no more asks on it
        self.off: str | None = None  # why the agent's meter is not used at all (it refused the op)
        self.refused = 0  # registrations the agent had no room for
        self.registered = 0  # threads the agent granted an entry
        self._rusage: dict[int, str] = {}  # native tid -> why its current measurement is getrusage's

    # -- registration -------------------------------------------------------------------------
    def add_source(self, ref: weakref.ref[Any], pid: int) -> None:
        """``pid``: the process that made the backend (its leases are that process's connections)."""
        with self._mu:
            self._sources = [(r, p) for r, p in self._sources if r() is not None] + [(ref, pid)]

    def _live(self) -> tuple[socket.socket, threading.Lock] | None:
        """A live connection of this process: the agent identifies us by it. A lease's, when this
        process made one; in a forked child its own (the parent's connections name the parent:
        the agent would refuse our tids and close the connection under the parent)."""
        if os.getpid() != self.pid:
            return None  # forked without the fork hooks (a fork from C): no connection is ours
        if self._own.live is not None:
            return self._own.get([])
        live = self._first() if self._first_pid == self.pid else None
        inherited = []
        for ref, pid in () if live is not None else list(self._sources):
            backend = ref()
            if backend is not None and pid == self.pid:
                live = lease_socket(backend)
                if live is not None:
                    break
            elif backend is not None:
                inherited.append(backend)
        return live if live is not None or not inherited else self._own.get(inherited)

    def _forked(self) -> None:
        """In a forked child (the only thread): nothing of the parent's is asked or read. Its
        pages' mappings and the locks (held by another thread at the fork, perhaps) are the
        child's copies and go; so does our copy of a connection of our parent's own (a child of
        a child): closing a duplicate leaves the connection the parent's, and lets the agent see
        it close when the parent exits."""
        self.pid = os.getpid()
        self._mu, self._ask_mu, self._local = threading.Lock(), threading.Lock(), threading.local()
        inherited, self._own = self._own, _own_for(self._key, self._own.connect)
        if inherited.live is not None and inherited is not self._own:
            inherited.live[0].close()
        self._new_era(None)
        self._by_tid = {}
        self._asks, self._quiet_era = [], -1
        self.refused = self.registered = 0
        self._rusage = {}

    def _reg(self) -> _Reg | None:
        reg: _Reg | None = getattr(self._local, "reg", None)
        if reg is not None and reg.era == self._era and reg.entry >= 0 and self._words is not None:
            return reg
        return None

    def _start(self) -> _Reg | None:
        """The calling thread's entry, asking the agent when it has none in the current pages."""
        reg: _Reg | None = getattr(self._local, "reg", None)
        live = None if self.off else self._live()
        if live is None:
            return None
        if live[0] is not self._sock:
            with self._mu:
                if live[0] is not self._sock:
                    self._new_era(live[0])
        if reg is not None and reg.era == self._era:
            if reg.entry >= 0:
                return reg
            if time.monotonic() < reg.retry_at:
                return None
        if self._quiet_era == self._era:
            return None
        with self._ask_mu:
            return self._ask(live[0], live[1])

    def _new_era(self, sock: socket.socket | None) -> None:
        """A new connection (the lease was replaced): its pages come with its first reply."""
        self._era += 1
        self._sock = sock
        self._by_tid.clear()
        self._words = self._begins = None
        for m in (self._page, self._begin_map):
            if m is not None:
                try:
                    m.close()
                except BufferError:
                    pass  # a reader still holds a view: the mapping goes with it
        self._page = self._begin_map = None

    def _ask(self, sock: socket.socket, lock: threading.Lock) -> _Reg | None:
        now = time.monotonic()
        with self._mu:
            self._asks = [t for t in self._asks if now - t < 1.0]
            if len(self._asks) >= ASKS_PER_SECOND:
                return None  # getrusage for this measurement; the next begin() asks again
            self._asks.append(now)
        tid = threading.get_native_id()
        reply, fds = ask_meter(sock, lock, tid)
        era = self._era
        try:
            if fds and len(fds) == 2 and self._words is None:
                self._map(fds[0], fds[1])
        finally:
            for fd in fds:
                _close(fd)
        if reply is None:
            self._quiet_era = era  # no answer: a closed connection brings a new era, else getrusage
            return None
        if not reply.get("ok"):
            if reply.get("full"):
                self.refused += 1
                self._local.reg = _Reg(era, -1, 0, now + RETRY_FULL)
            else:
                # An agent without the op (older), or one refusing our own thread: it closed that
                # connection (the lease reconnects); asking again would close the next one too.
                self.off = str(reply.get("error"))[:200]
                if self._own.live is not None:
                    self._own.drop(self.off, float("inf"))  # ours (we were forked): the agent closed it
                log.warning("rtml-ebpf: the node agent refused the thread meter (%s): admission measures "
                            "with getrusage", self.off)
            return None
        entry, gen = reply.get("entry"), reply.get("gen")
        if (isinstance(entry, bool) or not isinstance(entry, int) or not 0 <= entry < abi.TPAGE_ENTRIES
                or not isinstance(gen, int) or self._words is None):
            self._quiet_era = era  # a grant we cannot use (no pages came): this connection is asked no more
            return None
        reg = _Reg(era, entry, gen & _GEN_MASK)
        self._local.reg = reg
        self._by_tid[tid] = reg
        self._local.gone = _Gone(self._by_tid, tid)
        self.registered += 1
        return reg

    def _map(self, page_fd: int, begin_fd: int) -> None:
        page = mmap.mmap(page_fd, PAGE_SIZE, mmap.MAP_SHARED, mmap.PROT_READ)
        try:
            begins = mmap.mmap(begin_fd, PAGE_SIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError:
            page.close()
            raise
        self._page, self._begin_map = page, begins
        self._begins = memoryview(begins).cast("Q")
        self._words = memoryview(page).cast("q")

    # -- reads --------------------------------------------------------------------------------
    @staticmethod
    def _ours(w: memoryview, reg: _Reg) -> bool:
        """The entry has seen a charge since it became ours (else it still holds a former holder's)."""
        return bool((w[reg.entry * abi.TENTRY_WORDS + abi.TE_IDS] >> 32) & _GEN_MASK == reg.gen)

    def _net(self, w: memoryview, reg: _Reg) -> int:
        return int(w[reg.entry * abi.TENTRY_WORDS + abi.TE_NET]) if self._ours(w, reg) else 0

    @property
    def source(self) -> str:
        """What measures this process's threads (see the module's docstring). Reads /proc for
        the threads on getrusage (gone ones leave the count): for stats, not the hot path."""
        if self.off:
            return "rusage"
        _prune(self._rusage)
        return "agent+rusage" if self._rusage else "agent"

    def _fell_back(self, on_rusage: bool) -> None:
        """Record whether the calling thread's measurement (begun now) is getrusage's, and why."""
        self._local.rusage = on_rusage
        tid = threading.get_native_id()
        if not on_rusage:
            self._rusage.pop(tid, None)
            return
        self._rusage[tid] = _why_rusage(self, getattr(self._local, "reg", None))
        if len(self._rusage) > MAX_RUSAGE_TIDS:  # threads come and go while nobody reads stats
            _prune(self._rusage)

    def begin(self) -> int:
        reg = self._start()
        w, b = self._words, self._begins  # (locals: a new era may drop them meanwhile)
        if reg is None or w is None or b is None:
            self._fell_back(True)
            return RUSAGE.begin()
        self._fell_back(False)
        b[reg.entry] = (b[reg.entry] + 1) & 0xFFFFFFFFFFFFFFFF  # restarts the entry's peak
        return self._net(w, reg) * PAGE_SIZE

    def read(self) -> tuple[int, int]:
        reg = None if getattr(self._local, "rusage", True) else self._reg()
        w, b = self._words, self._begins
        if reg is None or w is None or b is None:
            return RUSAGE.read()
        base = reg.entry * abi.TENTRY_WORDS
        if not self._ours(w, reg):
            return 0, 0
        net = peak = int(w[base + abi.TE_NET])
        # the programs restart the peak at the first charge after our begin(): until then the
        # entry's number is the old one, and no charge since begin means no peak above the net
        if w[base + abi.TE_EPOCH] & 0xFFFFFFFFFFFFFFFF == b[reg.entry]:
            peak = max(net, int(w[base + abi.TE_PEAK]))
        return net * PAGE_SIZE, peak * PAGE_SIZE

    def reset_peak(self) -> None:
        reg = self._start()
        b = self._begins
        self._fell_back(reg is None or b is None)
        if reg is not None and b is not None:
            b[reg.entry] = (b[reg.entry] + 1) & 0xFFFFFFFFFFFFFFFF

    def net_of(self, tid: int) -> int | None:
        reg = self._by_tid.get(tid)
        w = self._words
        if reg is None or reg.era != self._era or w is None:
            return RUSAGE.net_of(tid)
        return self._net(w, reg) * PAGE_SIZE

    def stats(self) -> dict[str, Any]:
        """``connection``: "own" for a forked process's own, "lease" for a lease's, None before the
        first ask; ``fallback``: why a forked process measures with getrusage, when it does;
        ``rusage_threads``: live threads whose current measurement is getrusage's, and
        ``rusage_why`` the reasons (a reason -> how many)."""
        conn = None if self._sock is None else "own" if self._own.live is not None and \
            self._own.live[0] is self._sock else "lease"
        source = self.source
        whys: dict[str, int] = {}
        for why in list(self._rusage.values()):
            whys[why] = whys.get(why, 0) + 1
        return {"source": source, "threads": len(self._by_tid), "registered": self.registered,
                "refused": self.refused, "off": self.off, "pid": self.pid, "connection": conn,
                "fallback": self._own.why, "rusage_threads": sum(whys.values()), "rusage_why": whys}


def _why_rusage(m: AgentThreadMeter, reg: _Reg | None) -> str:
    """Why the calling thread's measurement, begun now, is getrusage's (``reg``: its entry)."""
    if m.off:
        return f"the agent refused the meter: {m.off}"
    if os.getpid() != m.pid:
        return "forked without the fork hooks (a fork from C): no connection of this process's own"
    if m._own.why is not None:
        return m._own.why
    if reg is not None and reg.era == m._era and reg.entry < 0:
        return f"the agent had no room for this thread (asks again {RETRY_FULL:.0f} s after)"
    if m._quiet_era == m._era:
        return "the agent did not answer a meter ask on this connection"
    if len(m._asks) >= ASKS_PER_SECOND:
        return f"more than {ASKS_PER_SECOND} new threads asked in a second (the agent's request rate)"
    return "no live connection to the agent (lost, or reconnecting)"


def _prune(table: dict[int, str]) -> None:
    """Drop the threads of ``table`` that have ended."""
    for tid in list(table):
        if not os.path.exists(f"/proc/self/task/{tid}"):
            table.pop(tid, None)


def _close(fd: int) -> None:
    os.close(fd)


def _after_fork_in_child() -> None:
    global _SHARED_MU
    _SHARED_MU = threading.Lock()
    for meter in list(_METERS):
        meter._forked()


os.register_at_fork(after_in_child=_after_fork_in_child)


class _Gone:
    """Held in the thread's locals only: when the thread ends, its tid leaves the meter's table."""

    __slots__ = ("table", "tid")

    def __init__(self, table: dict[int, _Reg], tid: int) -> None:
        self.table, self.tid = table, tid

    def __del__(self) -> None:
        self.table.pop(self.tid, None)
