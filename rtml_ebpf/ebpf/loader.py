"""Loads the packaged BPF object: probe -> open -> choose hooks -> load -> attach -> map.

One straight line, as libbpf-tools loaders are: each step names what failed, and whatever
was made is undone in reverse by :meth:`Loaded.close` on any failure (and at the end). The
result, a :class:`Loaded`, owns the object, its links and its mappings; nothing here knows
about cgroups or rules (see slots.py).
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from ..config import PAGE_SIZE
from ..errors import LoadError, NotSupported
from ..relief import trim_heap
from . import abi, probes
from . import libbpf as _libbpf
from .hooks import MEMCG, MEMCG_LRUVEC, PAGE_ALLOC, PAGE_FAULT_USER

log = logging.getLogger("rtml_ebpf")

OBJECT_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bpf", "rtml.bpf.o")
# Maps mapped into this process, with their value struct and entries.
MAPPED = {"slots": (abi.Slot, abi.MAX_SLOTS), "configs": (abi.Config, abi.MAX_SLOTS), "ctl": (abi.Ctl, 1),
          "threads": (abi.Thread, abi.MAX_THREADS)}
FD_ONLY = ("watch", "counters", "oom_events", "wake_events")
# Maps sized by the watched-cgroup capacity (the node agent sets it at load).
PER_SLOT_MAPS = ("watch", "slots", "configs", "counters", "pages")
# Programs a library process never loads: the agent's page publisher and beat.
AGENT_PROGRAMS = ("rtml_publish",)


def map_len(value_size: int, entries: int) -> int:
    # the kernel lays mmapable array elements at round_up(value_size, 8), in whole pages
    size = ((value_size + 7) // 8 * 8) * entries
    return (size + PAGE_SIZE - 1) // PAGE_SIZE * PAGE_SIZE


@dataclass
class Loaded:
    """The loaded object: what :func:`load` made, and the one way to undo it."""

    obj: int = 0
    links: dict[str, int] = field(default_factory=dict)  # hook name -> bpf_link *
    prog_ids: dict[str, int] = field(default_factory=dict)  # hook name -> kernel program id
    skipped: dict[str, str] = field(default_factory=dict)  # hook name -> why it is not attached
    fds: dict[str, int] = field(default_factory=dict)  # map name -> fd (owned by the object)
    maps: dict[str, mmap.mmap] = field(default_factory=dict)  # map name -> shared read-write mapping

    @property
    def hooks(self) -> tuple[str, ...]:
        return tuple(self.links)

    @property
    def memcg_events(self) -> bool:
        """True when the memcg stat events feed the slots (not only the fault hook)."""
        return any(h in self.links for h in MEMCG)

    def close(self, *, inherited: bool = False) -> None:
        """Undo in reverse: mappings, links, the object. A forked child that inherited all this
        leaves it to the loading process (its fds close at exit)."""
        maps, links, obj = self.maps, self.links, self.obj
        self.maps, self.links, self.obj = {}, {}, 0
        if inherited:
            return
        for mm in reversed(list(maps.values())):
            try:
                mm.close()
            except BufferError:
                pass  # a view still points into it (a kept check): it unmaps when that view goes
        lib = _libbpf._lib
        for link in reversed(list(links.values())):
            lib.bpf_link__destroy(link)
        if obj:
            lib.bpf_object__close(obj)


def choose_hooks(wanted: tuple[str, ...] | None) -> tuple[list[probes.Hook], dict[str, str]]:
    """The hooks to attach and, for the others, why not. ``wanted`` None: what the kernel
    offers, the fault hook only where the memcg events are missing (they follow every charge).
    The page allocator's hook only completes the fault hook's meter: it goes with that hook, never
    with the memcg events (they meter huge pages at their size already)."""
    memcg_events = all(probes.hook_unavailable(h) is None for h in probes.HOOKS if h.name in probes.MEMCG_HOOKS)
    chosen: list[probes.Hook] = []
    skipped: dict[str, str] = {}
    for hook in probes.HOOKS:  # page_alloc comes after the hooks it depends on
        names = {h.name for h in chosen}
        if wanted is not None and hook.name not in wanted:
            skipped[hook.name] = "not requested (RTML_HOOKS)"
        elif wanted is None and hook.name == PAGE_FAULT_USER and memcg_events:
            skipped[hook.name] = "not needed: memcg events are live (RTML_HOOKS=all adds it to count faults)"
        elif hook.name == PAGE_ALLOC and names & set(MEMCG):
            skipped[hook.name] = "not needed: the memcg events meter huge pages at their size"
        elif hook.name == PAGE_ALLOC and PAGE_FAULT_USER not in names:
            skipped[hook.name] = "not needed: it completes the page_fault_user meter, which is not attached"
        elif (why := probes.hook_unavailable(hook)) is not None:
            skipped[hook.name] = why
        else:
            chosen.append(hook)
    return chosen, skipped


def open_load_attach(path: str, attach: dict[str, str], disable: tuple[str, ...] = (),
                     prepare: Callable[[int], None] | None = None, need_links: bool = True) -> Loaded:
    """Open the object at ``path``, turn off the programs in ``disable``, ``prepare(obj)``
    (map sizes, reused maps), load, and attach each of ``attach`` (report name -> program
    name). A program that loads but will not attach is reported in ``skipped``, not fatal;
    none attached is, where ``need_links``. Undone on any failure."""
    lib = _libbpf.lib()
    _libbpf.take_log()
    name = os.path.basename(path)
    out = Loaded()
    try:
        out.obj = _libbpf.check_ptr(lib.bpf_object__open_file(path.encode(), None), "open", path)
        for program in disable:
            prog = _libbpf.check_ptr(lib.bpf_object__find_program_by_name(out.obj, program.encode()),
                                     "find program", program)
            _libbpf.check(lib.bpf_program__set_autoload(prog, False), "disable", program)
        if prepare is not None:
            prepare(out.obj)
        ret = lib.bpf_object__load(out.obj)
        if ret < 0:
            err = LoadError("load", name, -ret, _libbpf.take_log())
            if -ret == 1:  # EPERM: memlock on old kernels, or lockdown
                err.args = (err.args[0] + "\nhint: EPERM at load; check RLIMIT_MEMLOCK and kernel lockdown",)
            raise err
        for report, program in attach.items():
            prog = _libbpf.check_ptr(lib.bpf_object__find_program_by_name(out.obj, program.encode()),
                                     "find program", program)
            link = lib.bpf_program__attach(prog)
            if not link:
                errno = ctypes.get_errno()
                out.skipped[report] = f"attach failed: {os.strerror(errno) if errno else 'unknown'}"
                _libbpf.take_log()
                continue
            out.links[report] = link
            out.prog_ids[report] = _libbpf.prog_id(lib.bpf_program__fd(prog))
        if need_links and not out.links:
            raise NotSupported(f"BPF programs of {name}", "no program attached: " + "; ".join(
                f"{k}: {v}" for k, v in out.skipped.items()))
    except BaseException:
        out.close()
        raise
    return out


def map_into(out: Loaded, fd_only: tuple[str, ...], mapped: Mapping[str, tuple[type, int]]) -> None:
    """The fds of ``fd_only`` and ``mapped`` into ``out.fds``; ``mapped`` mapped read-write
    (name -> (value struct, entries))."""
    lib = _libbpf.lib()
    for name in (*fd_only, *mapped):
        m = _libbpf.check_ptr(lib.bpf_object__find_map_by_name(out.obj, name.encode()), "find map", name)
        out.fds[name] = _libbpf.check(lib.bpf_map__fd(m), "fd of map", name)
    for name, (struct, entries) in mapped.items():
        try:
            out.maps[name] = mmap.mmap(out.fds[name], map_len(ctypes.sizeof(struct), entries), mmap.MAP_SHARED,
                                       mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as exc:
            raise LoadError("mmap", f"map {name}", exc.errno or 0, "") from exc


def set_ctl_flags(out: Loaded) -> None:
    """What the attached hooks mean for the programs (ctl.flags), and the ABI version."""
    ctl = abi.Ctl.from_buffer(out.maps["ctl"])
    ctl.abi_version = abi.ABI_VERSION
    ctl.flags = (abi.CTL_TRACK_INACTIVE if MEMCG_LRUVEC in out.links else 0) | (
        0 if out.memcg_events else abi.CTL_FAULT_REFRESH) | abi.CTL_METER_OFF
    del ctl


def meter_on(ctl_map: mmap.mmap) -> None:
    """The per-thread meter is wanted: the programs charge registered threads from now on (for
    good: a store that only clears a bit, so concurrent callers agree)."""
    ctl = abi.Ctl.from_buffer(ctl_map)
    if ctl.flags & abi.CTL_METER_OFF:
        ctl.flags &= ~abi.CTL_METER_OFF
    del ctl


def _ring_sizer(ring_bytes: int) -> Callable[[int], None]:
    def prepare(obj: int) -> None:
        lib = _libbpf.lib()
        m = _libbpf.check_ptr(lib.bpf_object__find_map_by_name(obj, b"oom_events"), "find map", "oom_events")
        _libbpf.check(lib.bpf_map__set_max_entries(m, ring_bytes), "size map", "oom_events")
    return prepare


def load(wanted: tuple[str, ...] | None, ring_bytes: int = 0) -> Loaded:
    """Probe, choose the hooks, open/load/attach, map. On any failure everything is undone.
    ``ring_bytes``: size the OOM event ring for a reader (a library process has nobody reading
    it and keeps the one-page default)."""
    probes.check_privileges()
    probes.check_btf()
    if not os.path.exists(OBJECT_PATH):
        raise NotSupported("the BPF object", f"{OBJECT_PATH} is missing; build it with `make bpf` (needs clang) "
                           "or reinstall the package")
    chosen, skipped = choose_hooks(wanted)
    if not chosen:
        raise NotSupported("eBPF hooks", "; ".join(f"{k}: {v}" for k, v in skipped.items()))
    names = {h.name for h in chosen}
    try:
        out = open_load_attach(OBJECT_PATH, {h.name: h.program for h in chosen},
                               (*(h.program for h in probes.HOOKS if h.name not in names), *AGENT_PROGRAMS),
                               _ring_sizer(ring_bytes) if ring_bytes else None)
    except NotSupported as exc:
        raise NotSupported("eBPF hooks", f"{exc.reason}; " + "; ".join(f"{k}: {v}" for k, v in skipped.items())) \
            from None
    out.skipped = {**skipped, **out.skipped}
    try:
        map_into(out, FD_ONLY, MAPPED)
        set_ctl_flags(out)
    except BaseException:
        out.close()
        raise
    trim_heap()  # libbpf parsed the kernel's BTF (megabytes) to relocate: hand that heap back
    log.info("rtml-ebpf: BPF hooks live: %s; skipped: %s", ", ".join(out.links) or "none",
             "; ".join(f"{k} ({v})" for k, v in out.skipped.items()) or "none")
    return out
