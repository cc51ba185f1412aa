"""The node agent's BPF side: one load for the node, or adopting what a previous agent pinned;
one frozen page per client cgroup; the beat that tells clients the programs are alive.

Straight line as loader.py: probe -> (adopt pins | open, size, load, attach, pin) -> map.
Whatever was made is undone by :meth:`NodePrograms.close` (the pins stay unless asked).
"""

from __future__ import annotations

import ctypes
import logging
import os
import shutil
from dataclasses import dataclass, field

from ..ebpf import abi, probes
from ..ebpf import libbpf as _libbpf
from ..ebpf.loader import (
    AGENT_PROGRAMS,
    OBJECT_PATH,
    PER_SLOT_MAPS,
    Loaded,
    choose_hooks,
    map_into,
    open_load_attach,
    set_ctl_flags,
)
from ..errors import LoadError, NotSupported
from ..relief import trim_heap
from . import pinsafe
from .thread_pages import MAPS as THREAD_PAGE_MAPS
from .thread_pages import ThreadPages, size_map

log = logging.getLogger("rtml_ebpf.agent")

DEFAULT_PIN_DIR = "/sys/fs/bpf/rtml-ebpf"
MIN_CAPACITY = 64
MAX_CAPACITY = 65536
BPF_MAP_TYPE_ARRAY = 2
BPF_MAP_TYPE_ARRAY_OF_MAPS = 12
BPF_F_MMAPABLE = 1 << 10
BPF_FS_MAGIC_NAME = "bpf"
# Every map of the object, pinned under <pin dir>/maps; links under <pin dir>/links.
ALL_MAPS = ("watch", "slots", "configs", "counters", "ctl", "threads", "pages", "beat", "ticker", "wcache",
            "oom_events", "wake_events", *THREAD_PAGE_MAPS)
FD_ONLY = ("watch", "counters", "pages", "beat", "ticker", "oom_events", "wake_events", *THREAD_PAGE_MAPS)
OOM_RING_BYTES = 256 * 1024  # about 190 victims waiting: the agent reads them as they come


@dataclass
class NodePrograms:
    """The agent's loaded (or adopted) object, with its capacity and pin state."""

    loaded: Loaded
    capacity: int
    hooks: tuple[str, ...]
    adopted: bool
    pin_dir: str | None
    publish_fd: int = -1
    page_fds: dict[int, int] = field(default_factory=dict)  # slot -> fd of its page map
    prog_fds: dict[str, int] = field(default_factory=dict)  # hook -> fd of its program (run stats)
    _pinned_fds: list[int] = field(default_factory=list)
    extra: list[Loaded] = field(default_factory=list)  # programs attached again (reattach.py)
    thread_pages: ThreadPages | None = None  # the clients' thread meters (thread_pages.py)

    @property
    def memcg_events(self) -> bool:
        return any(h in self.hooks for h in probes.MEMCG_HOOKS)

    # -- pages --------------------------------------------------------------------------------
    def page_fd(self, slot: int, create: bool = True) -> int | None:
        """The fd of ``slot``'s page, made (and frozen, and filled) on first use. The agent never
        maps it: a frozen map refuses writable mappings and syscall writes, programs still write.
        ``create=False``: only a page that exists (one a previous agent made), else None."""
        fd = self.page_fds.get(slot)
        if fd is not None:
            return fd
        lib = _libbpf.lib()
        key = ctypes.c_uint32(slot)
        inner_id = ctypes.c_uint32()
        if lib.bpf_map_lookup_elem(self.loaded.fds["pages"], ctypes.byref(key), ctypes.byref(inner_id)) == 0:
            fd = _libbpf.check(lib.bpf_map_get_fd_by_id(inner_id.value), "open page of slot", str(slot))
        elif not create:
            return None
        else:
            opts = _libbpf.MapCreateOpts(sz=ctypes.sizeof(_libbpf.MapCreateOpts), map_flags=BPF_F_MMAPABLE)
            fd = _libbpf.check(lib.bpf_map_create(BPF_MAP_TYPE_ARRAY, b"rtml_page", 4, ctypes.sizeof(abi.Slot), 1,
                                                  ctypes.byref(opts)), "create page of slot", str(slot))
            try:
                _libbpf.check(lib.bpf_map_freeze(fd), "freeze page of slot", str(slot))
                value = ctypes.c_uint32(fd)
                _libbpf.check(lib.bpf_map_update_elem(self.loaded.fds["pages"], ctypes.byref(key),
                                                      ctypes.byref(value), 0), "install page of slot", str(slot))
            except BaseException:
                os.close(fd)
                raise
        self.page_fds[slot] = fd
        self.publish(slot)
        return fd

    def drop_page(self, slot: int) -> None:
        """The slot is freed: its page leaves the outer map (clients still mapping it keep a
        page nothing writes; they only ever had it for a cgroup that is gone)."""
        if self.thread_pages is not None:
            self.thread_pages.drop(slot)
        fd = self.page_fds.pop(slot, None)
        if fd is not None:
            self.publish(slot, abi.PUBLISH_RETIRE)
            os.close(fd)
        key = ctypes.c_uint32(slot)
        _libbpf.lib().bpf_map_delete_elem(self.loaded.fds["pages"], ctypes.byref(key))

    def client_page(self, slot: int) -> int:
        fd = self.page_fd(slot)
        assert fd is not None
        return fd

    def page_map_id(self, slot: int) -> int:
        return _libbpf.map_info(self.client_page(slot))[1]

    def publish(self, slot: int, flags: int = 0) -> None:
        """Copy ``slot`` into its page (after user space wrote the slot), by running the
        rtml_publish program: a frozen page takes writes from programs only."""
        if flags == 0 and slot not in self.page_fds:
            return  # no client page for this slot
        args = abi.PublishArgs(slot=slot, flags=flags)
        opts = _libbpf.TestRunOpts(sz=ctypes.sizeof(_libbpf.TestRunOpts), ctx_in=ctypes.addressof(args),
                                   ctx_size_in=ctypes.sizeof(args))
        _libbpf.check(_libbpf.lib().bpf_prog_test_run_opts(self.publish_fd, ctypes.byref(opts)),
                      "run", "rtml_publish")

    def run_stats(self) -> dict[str, tuple[int, int]]:
        """Each attached program's (nanoseconds run, runs), which the kernel counts while
        kernel.bpf_stats_enabled is 1 (zeros otherwise)."""
        out: dict[str, tuple[int, int]] = {}
        lib = _libbpf.lib()
        for hook, prog_id in self.loaded.prog_ids.items():
            fd = self.prog_fds.get(hook)
            if fd is None:
                fd = lib.bpf_prog_get_fd_by_id(prog_id)
                if fd < 0:
                    continue
                self.prog_fds[hook] = fd
            try:
                out[hook] = _libbpf.prog_run_stats(fd)
            except LoadError:
                continue
        return out

    @property
    def beat_fd(self) -> int:
        return self.loaded.fds["beat"]

    # -- teardown -----------------------------------------------------------------------------
    def close(self, *, unpin: bool = False) -> None:
        """Close our fds and mappings. Pinned programs keep running (a restarted agent adopts
        them) unless ``unpin``: then the pins go too and the programs detach."""
        for fd in self.page_fds.values():
            os.close(fd)
        self.page_fds.clear()
        if self.thread_pages is not None:
            self.thread_pages.close()
        for fd in [*self._pinned_fds, *self.prog_fds.values()]:
            os.close(fd)
        self._pinned_fds.clear()
        self.prog_fds.clear()
        for more in self.extra:
            more.close()
        self.extra.clear()
        self.loaded.close()
        if unpin and self.pin_dir:
            remove_pins(self.pin_dir)


def check_capacity(capacity: object) -> int:
    from ..errors import ConfigError

    if isinstance(capacity, bool) or not isinstance(capacity, int) or not MIN_CAPACITY <= capacity <= MAX_CAPACITY:
        raise ConfigError(f"--max-cgroups={capacity!r}: pass a whole number from {MIN_CAPACITY} to {MAX_CAPACITY}")
    return capacity


def bpffs_mounted_at(path: str) -> bool:
    """True when ``path`` lies in a bpf filesystem (pins can only live there)."""
    best, fstype = "", ""
    try:
        with open("/proc/self/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) < 3:
                    continue
                point = parts[1].replace("\\040", " ")
                if (path == point or path.startswith(point.rstrip("/") + "/")) and len(point) >= len(best):
                    best, fstype = point, parts[2]
    except OSError:
        return False
    return fstype == BPF_FS_MAGIC_NAME


def ensure_bpffs(pin_dir: str) -> None:
    """Mount bpffs at /sys/fs/bpf when the pin directory is under it and nothing is mounted:
    mode 0700 (bpffs defaults to 1777, where any user could plant names beside our pins)."""
    if bpffs_mounted_at(pin_dir):
        return
    mount_point = "/sys/fs/bpf"
    if not (pin_dir == mount_point or pin_dir.startswith(mount_point + "/")):
        raise NotSupported("pinning", f"{pin_dir} is not on a bpf filesystem; mount one there "
                                      "(mount -t bpf bpf <dir>) or pass --no-pin")
    libc = ctypes.CDLL(None, use_errno=True)
    os.makedirs(mount_point, exist_ok=True)
    if libc.mount(b"bpf", mount_point.encode(), b"bpf", 0, b"mode=0700") != 0:
        errno = ctypes.get_errno()
        raise NotSupported("pinning", f"mount -t bpf bpf {mount_point} failed: {os.strerror(errno)}; "
                                      "mount it on the host (or hostPath it into the pod) or pass --no-pin")
    log.info("rtml-ebpf agent: mounted bpffs at %s (mode 0700)", mount_point)


def remove_pins(pin_dir: str) -> None:
    """Unpin everything: programs detach when their last link reference goes."""
    if os.path.isdir(pin_dir):
        shutil.rmtree(pin_dir, ignore_errors=True)


def _pinned(pin_dir: str) -> tuple[dict[str, int], tuple[str, ...]] | None:
    """The pinned maps (name -> fd) and hook names, or None when nothing complete is pinned."""
    maps_dir, links_dir = os.path.join(pin_dir, "maps"), os.path.join(pin_dir, "links")
    if not os.path.isdir(maps_dir) or not os.path.isdir(links_dir):
        return None
    hooks = tuple(sorted(os.listdir(links_dir)))
    fds: dict[str, int] = {}
    lib = _libbpf.lib()
    for name in ALL_MAPS:
        fd = lib.bpf_obj_get(os.path.join(maps_dir, name).encode())
        if fd < 0:
            for other in fds.values():
                os.close(other)
            return None
        fds[name] = fd
    if not hooks:
        for fd in fds.values():
            os.close(fd)
        return None
    return fds, hooks


def _pinned_prog_ids(pin_dir: str) -> dict[str, int]:
    """Hook -> program id of each pinned link (an adopting agent did not load them)."""
    out: dict[str, int] = {}
    links_dir = os.path.join(pin_dir, "links")
    lib = _libbpf.lib()
    for hook in sorted(os.listdir(links_dir)):
        fd = lib.bpf_obj_get(os.path.join(links_dir, hook).encode())
        if fd < 0:
            continue
        try:
            out[hook] = _libbpf.link_prog_id(fd)
        except LoadError:
            pass
        finally:
            os.close(fd)
    return out


def _pinned_abi(fds: dict[str, int]) -> tuple[int, int]:
    """(ABI version written in the pinned ctl, capacity of the pinned slots)."""
    import mmap

    mm = mmap.mmap(fds["ctl"], 4096, mmap.MAP_SHARED, mmap.PROT_READ)
    try:
        version = abi.Ctl.from_buffer_copy(mm[: ctypes.sizeof(abi.Ctl)]).abi_version
    finally:
        mm.close()
    return int(version), _libbpf.map_info(fds["slots"])[4]


def _asked_hooks(wanted: tuple[str, ...] | None) -> tuple[str, ...] | None:
    """The hooks an explicit --hooks set would attach here (None for auto: adopt what is
    pinned, whatever it is, and say what that was)."""
    if wanted is None:
        return None
    chosen, _ = choose_hooks(wanted)
    return tuple(sorted(h.name for h in chosen))


def _create_map(name: bytes, map_type: int, value_size: int, entries: int, flags: int = 0, inner_fd: int = 0) -> int:
    opts = _libbpf.MapCreateOpts(sz=ctypes.sizeof(_libbpf.MapCreateOpts), map_flags=flags, inner_map_fd=inner_fd)
    return _libbpf.check(_libbpf.lib().bpf_map_create(map_type, name, 4, value_size, entries, ctypes.byref(opts)),
                         "create map", name.decode())


def _make_pages_map(capacity: int) -> int:
    """The outer map, made here from a template of our own: the pages we insert later must
    match the template exactly, and on 6.1 the one libbpf makes from the BTF definition does
    not accept them (EINVAL at insert, verified in the VM)."""
    template = _create_map(b"rtml_page", BPF_MAP_TYPE_ARRAY, ctypes.sizeof(abi.Slot), 1, BPF_F_MMAPABLE)
    try:
        # named as in the object: libbpf renames a reused map after the kernel's name
        return _create_map(b"pages", BPF_MAP_TYPE_ARRAY_OF_MAPS, 4, capacity, 0, template)
    finally:
        os.close(template)


def _sizer(capacity: int, reuse: dict[str, int] | None) -> object:
    def prepare(obj: int) -> None:
        lib = _libbpf.lib()
        for name in ALL_MAPS:
            m = _libbpf.check_ptr(lib.bpf_object__find_map_by_name(obj, name.encode()), "find map", name)
            if name in PER_SLOT_MAPS:
                _libbpf.check(lib.bpf_map__set_max_entries(m, capacity), "size map", name)
            elif name == "oom_events" and reuse is None:
                _libbpf.check(lib.bpf_map__set_max_entries(m, OOM_RING_BYTES), "size map", name)
            size_map(m, name, capacity, reuse is None)
            if reuse is not None:
                _libbpf.check(lib.bpf_map__reuse_fd(m, reuse[name]), "reuse pinned map", name)
            elif name == "pages":
                fd = _make_pages_map(capacity)
                try:
                    _libbpf.check(lib.bpf_map__reuse_fd(m, fd), "reuse map", name)  # libbpf keeps a dup
                finally:
                    os.close(fd)
    return prepare


def _pin_all(out: Loaded, pin_dir: str) -> None:
    try:
        _pin_into(out, pin_dir)
    except OSError as exc:
        raise LoadError("pin under", pin_dir, exc.errno or 0, str(exc)) from None


def _pin_into(out: Loaded, pin_dir: str) -> None:
    lib = _libbpf.lib()
    staging = pin_dir + "-new"  # bpffs refuses dots in names
    pinsafe.check_tree(pin_dir)  # never through a planted symlink or into another user's directory
    if pinsafe.check_own(staging):
        remove_pins(staging)
    os.makedirs(os.path.dirname(staging) or ".", exist_ok=True)
    pinsafe.make_dir(staging)
    pinsafe.make_dir(os.path.join(staging, "maps"))
    pinsafe.make_dir(os.path.join(staging, "links"))
    for name in ALL_MAPS:
        m = _libbpf.check_ptr(lib.bpf_object__find_map_by_name(out.obj, name.encode()), "find map", name)
        fd = lib.bpf_map__fd(m)
        _libbpf.check(lib.bpf_obj_pin(fd, os.path.join(staging, "maps", name).encode()), "pin map", name)
    for hook, link in out.links.items():
        _libbpf.check(lib.bpf_link__pin(link, os.path.join(staging, "links", hook).encode()), "pin link", hook)
    # The old pins (another ABI or capacity) go only now: their programs ran until ours were attached.
    remove_pins(pin_dir)
    os.rename(staging, pin_dir)


def load_node(capacity: int, wanted: tuple[str, ...] | None, pin_dir: str | None) -> NodePrograms:
    """Adopt a compatible pinned object under ``pin_dir`` (no gap: its programs never stopped),
    or load and attach a new one (pinning it when ``pin_dir``)."""
    probes.check_privileges()
    probes.check_btf()
    if not os.path.exists(OBJECT_PATH):
        raise NotSupported("the BPF object", f"{OBJECT_PATH} is missing; build it with `make bpf`")
    mapped = {"slots": (abi.Slot, capacity), "configs": (abi.Config, capacity), "ctl": (abi.Ctl, 1)}
    hook_programs = tuple(h.program for h in probes.HOOKS)
    if pin_dir is not None:
        ensure_bpffs(pin_dir)
        pinsafe.check_tree(pin_dir)
        pinned = _pinned(pin_dir)
        if pinned is not None:
            fds, hooks = pinned
            version, pinned_capacity = _pinned_abi(fds)
            asked = _asked_hooks(wanted)
            if asked is not None and set(asked) != set(hooks):
                log.warning("rtml-ebpf agent: pinned programs under %s attach %s; --hooks asks for %s: loading "
                            "those, then replacing the pins", pin_dir, ", ".join(hooks), ", ".join(asked))
            elif version == abi.ABI_VERSION and pinned_capacity == capacity:
                try:
                    out = open_load_attach(OBJECT_PATH, {}, hook_programs, _sizer(capacity, fds),  # type: ignore[arg-type]
                                           need_links=False)
                    map_into(out, FD_ONLY, mapped)
                finally:
                    for fd in fds.values():
                        os.close(fd)  # libbpf holds its own duplicates
                out.prog_ids = _pinned_prog_ids(pin_dir)
                node = NodePrograms(out, capacity, hooks, True, pin_dir)
                log.info("rtml-ebpf agent: adopting the pinned programs under %s (hooks %s; --hooks %s)", pin_dir,
                         ", ".join(hooks), "auto: what is pinned" if wanted is None else ", ".join(wanted))
                return _finish(node)
            else:
                log.warning("rtml-ebpf agent: pinned programs under %s have ABI %d and %d cgroups, this agent ABI %d "
                            "and %d: loading new ones, then replacing the pins", pin_dir, version, pinned_capacity,
                            abi.ABI_VERSION, capacity)
            for fd in fds.values():
                os.close(fd)
    chosen, skipped = choose_hooks(wanted)
    if not chosen:
        raise NotSupported("eBPF hooks", "; ".join(f"{k}: {v}" for k, v in skipped.items()))
    names = {h.name for h in chosen}
    out = open_load_attach(OBJECT_PATH, {h.name: h.program for h in chosen},
                           tuple(h.program for h in probes.HOOKS if h.name not in names),
                           _sizer(capacity, None))  # type: ignore[arg-type]
    out.skipped = {**skipped, **out.skipped}
    try:
        map_into(out, FD_ONLY, mapped)
        set_ctl_flags(out)
        if pin_dir is not None:
            _pin_all(out, pin_dir)
    except BaseException:
        out.close()
        raise
    return _finish(NodePrograms(out, capacity, out.hooks, False, pin_dir))


def _finish(node: NodePrograms) -> NodePrograms:
    lib = _libbpf.lib()
    try:
        prog = _libbpf.check_ptr(lib.bpf_object__find_program_by_name(node.loaded.obj, AGENT_PROGRAMS[0].encode()),
                                 "find program", AGENT_PROGRAMS[0])
        node.publish_fd = _libbpf.check(lib.bpf_program__fd(prog), "fd of program", AGENT_PROGRAMS[0])
        # Clients map the beat read-only: freeze it first (harmless when already frozen by the
        # agent that pinned it). The timer restarts with this agent's program.
        ret = lib.bpf_map_freeze(node.beat_fd)
        if ret < 0 and not (node.adopted and -ret in (1, 16)):  # adopted: frozen already (EPERM/EBUSY)
            raise LoadError("freeze", "map beat", -ret, _libbpf.take_log())
        node.publish(node.capacity, abi.PUBLISH_START_BEAT)  # slot out of range: only the beat
        node.thread_pages = ThreadPages(node.loaded.fds, node.capacity, node.adopted)
    except BaseException:
        node.close()
        raise
    trim_heap()
    return node
