"""Which memory cgroups of the node the agent watches: every one with a limit of its own, or
those whose path matches a ``--watch`` glob.

Cgroups are followed by inotify on each directory of the memory hierarchy (kernfs reports
mkdir and rmdir like any filesystem): a new or removed cgroup is seen at once, and an idle node
costs nothing. A full walk runs at start, after an event-queue overflow, and every
FULL_SCAN_INTERVAL as a safety net; where inotify is unavailable (watch limit reached), the walk
runs every FALLBACK_INTERVAL instead. A cgroup without a limit is looked at again for a few
seconds after it appears (runtimes write the limit just after mkdir), then every
UNWANTED_RECHECK_INTERVAL.
"""

from __future__ import annotations

import ctypes
import errno
import fnmatch
import logging
import os
import struct
import time
from dataclasses import dataclass

from .. import _cgroup
from ..errors import CgroupNotFound

log = logging.getLogger("rtml_ebpf.agent")

FULL_SCAN_INTERVAL = 30.0
FALLBACK_INTERVAL = 0.5
FRESH_SECONDS = 5.0  # a new cgroup without a limit is re-read at every tick for this long
UNWANTED_RECHECK_INTERVAL = 10.0
IN_CREATE, IN_DELETE, IN_DELETE_SELF, IN_IGNORED, IN_Q_OVERFLOW = 0x100, 0x200, 0x400, 0x8000, 0x4000
IN_ISDIR, IN_ONLYDIR, IN_NONBLOCK, IN_CLOEXEC = 0x40000000, 0x01000000, 0o4000, 0o2000000
_EVENT = struct.Struct("iIII")


@dataclass(frozen=True)
class Found:
    cgroup: _cgroup.MemoryCgroup
    cgroup_id: int


def memory_mount(procfs: str = "/proc") -> _cgroup.Mount:
    """The memory hierarchy this process sees (v1 memory controller, else cgroup2)."""
    mounts = _cgroup.parse_mountinfo(_cgroup.read_text(os.path.join(procfs, "self", "mountinfo")))
    v1 = [m for m in mounts if m.version == 1 and "memory" in m.controllers]
    v2 = [m for m in mounts if m.version == 2]
    for group in (v1, v2):
        if group:
            return min(group, key=lambda m: len(m.root))  # the widest view (the hierarchy root if mounted)
    raise CgroupNotFound("no memory cgroup hierarchy is mounted: mount cgroup2 at /sys/fs/cgroup")


class _Inotify:
    def __init__(self) -> None:
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.fd = self.libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")

    def add(self, path: str) -> int:
        wd = self.libc.inotify_add_watch(self.fd, path.encode(), IN_CREATE | IN_DELETE | IN_DELETE_SELF | IN_ONLYDIR)
        if wd < 0:
            raise OSError(ctypes.get_errno(), f"inotify_add_watch {path}")
        return int(wd)

    def read(self) -> list[tuple[int, int, str]]:
        out: list[tuple[int, int, str]] = []
        while True:
            try:
                data = os.read(self.fd, 65536)
            except BlockingIOError:
                return out
            off = 0
            while off + _EVENT.size <= len(data):
                wd, mask, _, length = _EVENT.unpack_from(data, off)
                name = data[off + _EVENT.size : off + _EVENT.size + length].split(b"\0", 1)[0].decode(errors="replace")
                out.append((wd, mask, name))
                off += _EVENT.size + length

    def close(self) -> None:
        os.close(self.fd)


class Scanner:
    """The hierarchy's directories (by inode, the cgroup id) and the wanted ones among them.

    ``changes()`` returns what appeared (wanted) and what went since the last call."""

    def __init__(self, mount: _cgroup.Mount, globs: tuple[str, ...] = (), follow: bool = True) -> None:
        self.mount = mount
        self.globs = globs
        self.limit_file = _cgroup.file_name("limit", mount.version)
        self.present: dict[int, str] = {}  # cgroup id -> directory
        self.wanted: dict[int, Found] = {}
        self._unwanted: dict[int, tuple[float, float]] = {}  # id -> (first seen, last checked)
        self._added: dict[int, Found] = {}
        self._removed: set[int] = set()
        self._wd_dir: dict[int, str] = {}
        self._next_full = 0.0
        self.inotify: _Inotify | None = None
        if follow:
            try:
                self.inotify = _Inotify()
            except OSError as exc:
                log.warning("rtml-ebpf agent: no inotify (%s): walking the hierarchy every %.1f s", exc,
                            FALLBACK_INTERVAL)
        self.full_scan()

    @property
    def fd(self) -> int | None:
        return None if self.inotify is None else self.inotify.fd

    def cgroup_at(self, directory: str) -> _cgroup.MemoryCgroup:
        rel = os.path.relpath(directory, self.mount.mount_point)
        rel_path = "/" if rel == "." else "/" + rel
        path = os.path.normpath(self.mount.root.rstrip("/") + rel_path) if self.mount.root != "/" else rel_path
        return _cgroup.MemoryCgroup(self.mount.version, path, directory, self.mount)

    def _is_wanted(self, cg: _cgroup.MemoryCgroup) -> bool:
        if self.globs:
            return any(fnmatch.fnmatchcase(cg.path, g) for g in self.globs)
        try:
            with open(os.path.join(cg.directory, self.limit_file)) as f:
                return _cgroup.parse_limit(f.read()) is not None
        except OSError:
            return False  # the v2 root, a cgroup without the memory controller, or just removed

    # -- discovery ------------------------------------------------------------------------------
    def _visit(self, directory: str, ino: int, now: float) -> None:
        if ino in self.present:
            return
        self.present[ino] = directory
        self._removed.discard(ino)
        if self.inotify is not None:
            try:
                self._wd_dir[self.inotify.add(directory)] = directory
            except OSError as exc:
                if exc.errno in (errno.ENOSPC, errno.ENOMEM):
                    log.warning("rtml-ebpf agent: inotify watch limit reached (%s): walking the hierarchy every "
                                "%.1f s instead (raise fs.inotify.max_user_watches)", exc, FALLBACK_INTERVAL)
                    self.inotify.close()
                    self.inotify = None
                    self._wd_dir.clear()
        if directory == self.mount.mount_point:
            return  # the hierarchy root has no limit of its own
        self._judge(ino, directory, now)

    def _judge(self, ino: int, directory: str, now: float) -> None:
        cg = self.cgroup_at(directory)
        if self._is_wanted(cg):
            found = Found(cg, ino)
            self.wanted[ino] = found
            self._added[ino] = found
            self._unwanted.pop(ino, None)
        else:
            first = self._unwanted.get(ino, (now, now))[0]
            self._unwanted[ino] = (first, now)

    def _walk(self, top: str, now: float) -> set[int]:
        seen: set[int] = set()
        try:
            top_ino = os.stat(top).st_ino
        except OSError:
            return seen
        stack = [(top, top_ino)]
        while stack:
            directory, ino = stack.pop()
            seen.add(ino)
            self._visit(directory, ino, now)
            try:
                with os.scandir(directory) as it:
                    for entry in it:
                        if entry.is_dir(follow_symlinks=False):
                            stack.append((entry.path, entry.inode()))
            except OSError:
                continue  # removed while we walked
        return seen

    def full_scan(self) -> None:
        now = time.monotonic()
        seen = self._walk(self.mount.mount_point, now)
        for ino in [i for i in self.present if i not in seen]:
            self._gone(ino)
        self._next_full = now + (FULL_SCAN_INTERVAL if self.inotify is not None else FALLBACK_INTERVAL)

    def _gone(self, ino: int) -> None:
        self.present.pop(ino, None)
        self._unwanted.pop(ino, None)
        if self.wanted.pop(ino, None) is not None or ino in self._added:
            self._added.pop(ino, None)
        self._removed.add(ino)

    def on_events(self) -> None:
        """Read the inotify queue: new directories walked (their subtrees too: a child made
        before our watch was added has no event), removed ones forgotten."""
        if self.inotify is None:
            return
        now = time.monotonic()
        by_dir = {d: i for i, d in self.present.items()}
        for wd, mask, name in self.inotify.read():
            if mask & IN_Q_OVERFLOW:
                self.full_scan()
                return
            parent = self._wd_dir.get(wd)
            if mask & IN_IGNORED:
                self._wd_dir.pop(wd, None)
                continue
            if parent is None or not (mask & IN_ISDIR) or not name:
                continue
            path = os.path.join(parent, name)
            if mask & IN_CREATE:
                self._walk(path, now)
            elif mask & IN_DELETE:
                ino = by_dir.get(path)
                if ino is not None:
                    self._gone(ino)

    def tick(self) -> None:
        """Periodic: the safety-net walk when due, and another look at unlimited cgroups."""
        now = time.monotonic()
        if now >= self._next_full:
            self.full_scan()
            return
        if self.globs:
            return  # a path never stops or starts matching
        for ino, (first, last) in list(self._unwanted.items()):
            due = now - first < FRESH_SECONDS or now - last >= UNWANTED_RECHECK_INTERVAL
            directory = self.present.get(ino)
            if due and directory is not None:
                self._judge(ino, directory, now)

    def changes(self) -> tuple[list[Found], set[int]]:
        """(wanted cgroups that appeared, cgroup ids that went) since the last call."""
        added, removed = list(self._added.values()), set(self._removed)
        self._added.clear()
        self._removed.clear()
        return added, removed

    def scan(self) -> dict[int, Found]:
        """Every wanted cgroup now (a full walk)."""
        self.full_scan()
        return dict(self.wanted)

    def close(self) -> None:
        if self.inotify is not None:
            self.inotify.close()
            self.inotify = None
