"""The per-thread meters the agent lends its unprivileged clients (bpf/thread_pages.bpf.h).

Per client cgroup (slot), made on its first ``meter`` request: a meter page (frozen: the
programs write it, the client maps it read-only) and a begin page (the client's, read-write: a
number per entry that restarts the entry's peak). The agent alone writes ``tmeters`` (host tid
-> slot, entry, allocation number, process) and ``tmeter_n`` (how many; 0 stops the programs
at one compare). An entry is freed when its connection closes, when the slot is freed, or, when
the page is full, once its thread is gone.
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass
from typing import Any

from ..ebpf import abi
from ..ebpf import libbpf as _libbpf
from ..errors import CapacityError

MAPS = ("tmeters", "tpages", "tbegins", "tmeter_n")
OUTER = {"tpages": abi.TPage, "tbegins": abi.TBegin}
BPF_MAP_TYPE_ARRAY = 2
BPF_MAP_TYPE_ARRAY_OF_MAPS = 12
BPF_F_MMAPABLE = 1 << 10
PER_CONNECTION = abi.TPAGE_ENTRIES // 2  # one process cannot take its whole cgroup's page


def _create(name: bytes, map_type: int, value_size: int, entries: int, flags: int = 0, inner_fd: int = 0) -> int:
    opts = _libbpf.MapCreateOpts(sz=ctypes.sizeof(_libbpf.MapCreateOpts), map_flags=flags, inner_map_fd=inner_fd)
    return _libbpf.check(_libbpf.lib().bpf_map_create(map_type, name, 4, value_size, entries, ctypes.byref(opts)),
                         "create map", name.decode())


def _inner(name: str) -> int:
    return _create(f"rtml_{name[:-1]}".encode(), BPF_MAP_TYPE_ARRAY, ctypes.sizeof(OUTER[name]), 1, BPF_F_MMAPABLE)


def size_map(m: int, name: str, capacity: int, fresh: bool) -> None:
    """At load (before the programs are): the outer maps get ``capacity`` slots (made here from a
    template of our own, as programs.py does for ``pages``, when not reusing pins); ``tmeters``
    gets room for the node's client threads."""
    lib = _libbpf.lib()
    if name == "tmeters":
        _libbpf.check(lib.bpf_map__set_max_entries(m, abi.TMETER_MAX), "size map", name)
    elif name in OUTER:
        _libbpf.check(lib.bpf_map__set_max_entries(m, capacity), "size map", name)
        if fresh:
            template = _inner(name)
            try:
                fd = _create(name.encode(), BPF_MAP_TYPE_ARRAY_OF_MAPS, 4, capacity, 0, template)
            finally:
                os.close(template)
            try:
                _libbpf.check(lib.bpf_map__reuse_fd(m, fd), "reuse map", name)  # libbpf keeps a dup
            finally:
                os.close(fd)


@dataclass
class Held:
    conn: int  # the connection that asked (its close frees the entry)
    pid: int  # the asking process (agent's pid namespace)
    tid: int  # the thread (host tid: what the programs see)
    slot: int
    entry: int


class ThreadPages:
    """The agent's side of the client meters: pages per slot, entries per thread."""

    def __init__(self, fds: dict[str, int], capacity: int, adopted: bool) -> None:
        self.fds = fds
        self.capacity = capacity
        self.pages: dict[int, tuple[int, int]] = {}  # slot -> (meter page fd, begin page fd)
        self.entries: dict[int, list[Held | None]] = {}  # slot -> its page's entries
        self.by_tid: dict[int, Held] = {}
        self.given: set[int] = set()  # connections that were passed their pages
        self.gen = 0
        if adopted:
            self.reset()  # what the previous agent registered is void: its connections are gone

    # -- maps ---------------------------------------------------------------------------------
    def reset(self) -> None:
        """Start empty (an adopted load keeps what the previous agent wrote; its clients are gone)."""
        lib = _libbpf.lib()
        key, nxt = ctypes.c_uint32(), ctypes.c_uint32()
        while lib.bpf_map_get_next_key(self.fds["tmeters"], None, ctypes.byref(nxt)) == 0:
            key.value = nxt.value
            if lib.bpf_map_delete_elem(self.fds["tmeters"], ctypes.byref(key)) != 0:
                break
        # The previous agent's pages stay in the outer maps: with no tmeters entry nothing charges
        # them, and a slot's first use here installs new ones over them (page_fds). Walking every
        # slot to delete them took minutes in the 6.1 VM (a syscall or two per slot, 4096 slots,
        # each delete from a map of maps waiting an RCU grace period before 6.7).
        self._write_count()

    def _write_count(self) -> None:
        zero, n = ctypes.c_uint32(0), ctypes.c_uint32(len(self.by_tid))
        _libbpf.check(_libbpf.lib().bpf_map_update_elem(self.fds["tmeter_n"], ctypes.byref(zero), ctypes.byref(n),
                                                        0), "update map", "tmeter_n")

    def page_fds(self, slot: int) -> tuple[int, int]:
        """The slot's (meter, begin) pages, made on first use: the meter page frozen before it is
        installed, so no process can ever write it through a syscall or a writable mapping."""
        made = self.pages.get(slot)
        if made is not None:
            return made
        lib = _libbpf.lib()
        key = ctypes.c_uint32(slot)
        fds: list[int] = []
        try:
            for name in OUTER:
                fd = _inner(name)
                fds.append(fd)
                if name == "tpages":
                    _libbpf.check(lib.bpf_map_freeze(fd), "freeze meter page of slot", str(slot))
                value = ctypes.c_uint32(fd)
                _libbpf.check(lib.bpf_map_update_elem(self.fds[name], ctypes.byref(key), ctypes.byref(value), 0),
                              f"install {name[:-1]} of slot", str(slot))
        except BaseException:
            for fd in fds:
                os.close(fd)
            for name in OUTER:
                lib.bpf_map_delete_elem(self.fds[name], ctypes.byref(key))
            raise
        self.pages[slot] = made = (fds[0], fds[1])
        self.entries[slot] = [None] * abi.TPAGE_ENTRIES
        return made

    # -- entries ------------------------------------------------------------------------------
    def register(self, conn: int, pid: int, tid: int, slot: int) -> tuple[int, int]:
        """An entry of ``slot``'s page for thread ``tid`` of process ``pid`` (both checked by the
        caller), held by connection ``conn``: (entry, allocation number). CapacityError when the
        connection, the page or the node has no room."""
        old = self.by_tid.get(tid)
        if old is not None and old.conn == conn and old.slot == slot and old.pid == pid:
            entry = old.entry  # asked again (a reconnect that reused the socket number): a fresh start
            self._free(old)
        else:
            if old is not None:
                self._free(old)  # a reused tid, or another connection of the same thread: the last ask wins
            if sum(1 for h in self.by_tid.values() if h.conn == conn) >= PER_CONNECTION:
                raise CapacityError(f"this connection holds {PER_CONNECTION} thread meters already, the most one "
                                    "may; further threads use getrusage")
            if len(self.by_tid) >= abi.TMETER_MAX:
                raise CapacityError(f"the node's {abi.TMETER_MAX} client thread meters are in use; this thread "
                                    "uses getrusage")
            self.page_fds(slot)
            entry = self._free_entry(slot)
        self.gen = self.gen % 0xFFFFFFFF + 1  # never 0: a fresh page's entries hold gen 0
        held = Held(conn, pid, tid, slot, entry)
        ref = abi.TRef(slot=slot, entry=entry, gen=self.gen, tgid=pid)
        key = ctypes.c_uint32(tid)
        _libbpf.check(_libbpf.lib().bpf_map_update_elem(self.fds["tmeters"], ctypes.byref(key), ctypes.byref(ref), 0),
                      "update map", "tmeters")
        self.entries[slot][entry] = held
        self.by_tid[tid] = held
        self._write_count()
        return entry, self.gen

    def _free_entry(self, slot: int) -> int:
        table = self.entries[slot]
        for i, held in enumerate(table):
            if held is None:
                return i
        for held in list(table):  # full: entries of threads that are gone go now
            if held is not None and not os.path.exists(f"/proc/{held.pid}/task/{held.tid}"):
                self._free(held)
        for i, held in enumerate(table):
            if held is None:
                return i
        raise CapacityError(f"the {abi.TPAGE_ENTRIES} thread meters of your cgroup are in use by live threads; "
                            "this thread uses getrusage")

    def _free(self, held: Held) -> None:
        key = ctypes.c_uint32(held.tid)
        _libbpf.lib().bpf_map_delete_elem(self.fds["tmeters"], ctypes.byref(key))
        self.by_tid.pop(held.tid, None)
        table = self.entries.get(held.slot)
        if table is not None and table[held.entry] is held:
            table[held.entry] = None

    def release(self, conn: int) -> None:
        """The connection closed: its threads are metered no more."""
        self.given.discard(conn)
        mine = [h for h in self.by_tid.values() if h.conn == conn]
        for held in mine:
            self._free(held)
        if mine:
            self._write_count()

    def drop(self, slot: int) -> None:
        """The slot is freed (its cgroup has no lease left): its entries and pages go."""
        for held in [h for h in self.by_tid.values() if h.slot == slot]:
            self._free(held)
        self._write_count()
        self.entries.pop(slot, None)
        fds = self.pages.pop(slot, None)
        key = ctypes.c_uint32(slot)
        for name in OUTER:
            _libbpf.lib().bpf_map_delete_elem(self.fds[name], ctypes.byref(key))
        if fds is not None:
            for fd in fds:
                os.close(fd)

    def stats(self) -> dict[str, Any]:
        return {"threads": len(self.by_tid), "cgroups": len(self.pages)}

    def close(self) -> None:
        for fds in self.pages.values():
            for fd in fds:
                os.close(fd)
        self.pages.clear()
