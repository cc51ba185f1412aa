"""Which memory cgroups of the node the agent watches: every one with a limit of its own, or
those whose path matches a ``--watch`` glob. One walk of the memory hierarchy per scan."""

from __future__ import annotations

import fnmatch
import os
from dataclasses import dataclass

from .. import _cgroup
from ..errors import CgroupNotFound


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


class Scanner:
    """Walks the memory hierarchy; ``scan()`` returns the wanted cgroups by id."""

    def __init__(self, mount: _cgroup.Mount, globs: tuple[str, ...] = ()) -> None:
        self.mount = mount
        self.globs = globs
        self.limit_file = _cgroup.file_name("limit", mount.version)

    def cgroup_at(self, directory: str) -> _cgroup.MemoryCgroup:
        rel = os.path.relpath(directory, self.mount.mount_point)
        rel_path = "/" if rel == "." else "/" + rel
        path = os.path.normpath(self.mount.root.rstrip("/") + rel_path) if self.mount.root != "/" else rel_path
        return _cgroup.MemoryCgroup(self.mount.version, path, directory, self.mount)

    def wanted(self, path: str, directory: str) -> bool:
        if self.globs:
            return any(fnmatch.fnmatchcase(path, g) for g in self.globs)
        try:
            with open(os.path.join(directory, self.limit_file)) as f:
                return _cgroup.parse_limit(f.read()) is not None
        except OSError:
            return False  # the v2 root, a cgroup without the memory controller, or just removed

    def scan(self) -> dict[int, Found]:
        out: dict[int, Found] = {}
        stack = [self.mount.mount_point]
        while stack:
            directory = stack.pop()
            try:
                entries = list(os.scandir(directory))
            except OSError:
                continue  # removed while we walked
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    stack.append(entry.path)
            if directory == self.mount.mount_point:
                continue  # the hierarchy root has no limit of its own
            cg = self.cgroup_at(directory)
            if not self.wanted(cg.path, directory):
                continue
            try:
                cgid = os.stat(directory).st_ino
            except OSError:
                continue
            out[cgid] = Found(cg, cgid)
        return out
