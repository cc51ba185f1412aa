"""Memory cgroup discovery and the raw cgroup file readings (v1, v2, hybrid).

Everything that knows a cgroup file name lives here, like psutil keeps each
platform's raw reading in one module. Paths are resolved against ``rootfs``
and ``procfs`` so that tests can point them at fixture trees.

Vocabulary:
  * *cgroup path*: the path as ``/proc/<pid>/cgroup`` prints it, relative to
    the reader's cgroup namespace root (``/`` inside most containers).
  * *directory*: where that cgroup's files are on this filesystem.
  * *mount root*: the highest cgroup directory we can see; limits above it
    are invisible to file reads (v1 reports them in ``hierarchical_memory_limit``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from .errors import CgroupNotFound

# Every memory-controller file we read or write, by what it holds: (cgroup v1 name, v2 name).
FILES = {
    "usage": ("memory.usage_in_bytes", "memory.current"),
    "limit": ("memory.limit_in_bytes", "memory.max"),
    "peak": ("memory.max_usage_in_bytes", "memory.peak"),
    "events": ("memory.oom_control", "memory.events"),  # both carry oom_kill
    "stat": ("memory.stat", "memory.stat"),
    "high": ("", "memory.high"),  # v2 only: v1 has no throttling boundary below the limit
    "pressure": ("", "memory.pressure"),  # v2 only (PSI per cgroup); see _psi.py
}
INACTIVE_FILE_KEY = ("total_inactive_file", "inactive_file")  # in memory.stat, v1 / v2


def file_name(what: str, version: int) -> str:
    """The file that holds ``what`` (a FILES key) in a cgroup of ``version``."""
    return FILES[what][version - 1]


# v1 reports "no limit" as PAGE_COUNTER_MAX * PAGE_SIZE (9223372036854771712 with
# 4 KiB pages); anything at or above 2^60 bytes is no real limit.
UNLIMITED_BYTES = 1 << 60


@dataclass(frozen=True)
class Mount:
    """One cgroup mount from mountinfo."""

    version: int  # 1 or 2
    root: str  # path inside the hierarchy that is mounted here
    mount_point: str  # absolute path, rootfs applied
    controllers: frozenset[str]


@dataclass(frozen=True)
class LimitInfo:
    """The tightest memory limit on the path from a cgroup up to the mount root."""

    limit_bytes: int | None  # None: no limit anywhere we can see
    source: str | None  # directory that sets it, or a note when it is above the mount root
    limited: tuple[tuple[str, int], ...]  # every (directory, limit) on the path that has one


@dataclass(frozen=True)
class MemoryCgroup:
    """A process's (or a given) memory cgroup and where its files are."""

    version: int
    path: str
    directory: str
    mount: Mount

    @property
    def cgroup_id(self) -> int:
        """The id BPF sees for this cgroup: the kernfs inode of its directory."""
        return os.stat(self.directory).st_ino

    @property
    def depth(self) -> int:
        """Levels below the namespace's hierarchy root: a lower bound of the kernel's level."""
        parts = [p for p in self.path.split("/") if p]
        return len(parts)

    # -- file names by version ---------------------------------------------------------
    @property
    def usage_file(self) -> str:
        return file_name("usage", self.version)

    @property
    def limit_file(self) -> str:
        return file_name("limit", self.version)

    @property
    def inactive_file_key(self) -> str:
        return INACTIVE_FILE_KEY[self.version - 1]

    def file(self, name: str, directory: str | None = None) -> str:
        return os.path.join(directory or self.directory, name)

    # -- readings ----------------------------------------------------------------------
    def read_usage(self, directory: str | None = None) -> int:
        return int(read_text(self.file(self.usage_file, directory)))

    def read_stat(self) -> dict[str, int]:
        return parse_flat_keyed(read_text(self.file(file_name("stat", self.version))))

    def read_inactive_file(self) -> int:
        return self.read_stat().get(self.inactive_file_key, 0)

    def read_limit(self, directory: str | None = None) -> int | None:
        path = self.file(self.limit_file, directory)
        try:
            text = read_text(path)
        except FileNotFoundError:
            return None  # the v2 root cgroup has no memory.max: no limit there
        return parse_limit(text)

    def read_high(self, directory: str | None = None) -> int | None:
        """memory.high in bytes (v2); None where unset ("max"), absent (the root) and on v1."""
        if self.version == 1:
            return None
        try:
            text = read_text(self.file(file_name("high", 2), directory))
        except FileNotFoundError:
            return None
        return parse_limit(text)

    def effective_high(self) -> LimitInfo:
        """The lowest memory.high on the visible path (v2). v1 has no memory.high: always none."""
        best: int | None = None
        source: str | None = None
        limited: list[tuple[str, int]] = []
        for directory in self.ancestors() if self.version == 2 else []:
            high = self.read_high(directory)
            if high is None:
                continue
            limited.append((directory, high))
            if best is None or high < best:
                best, source = high, directory
        return LimitInfo(best, source, tuple(limited))

    def ancestors(self) -> list[str]:
        """This directory and each parent up to the mount point, nearest first."""
        out = [self.directory]
        top = os.path.normpath(self.mount.mount_point)
        cur = os.path.normpath(self.directory)
        while cur != top and cur.startswith(top + os.sep):
            cur = os.path.dirname(cur)
            out.append(cur)
        return out

    def effective_limit(self) -> LimitInfo:
        """Tightest limit on the visible path; on v1 also the kernel's hierarchical figure."""
        best: int | None = None
        source: str | None = None
        limited: list[tuple[str, int]] = []
        for directory in self.ancestors():
            limit = self.read_limit(directory)
            if limit is None:
                continue
            limited.append((directory, limit))
            if best is None or limit < best:
                best, source = limit, directory
        if self.version == 1:
            # The kernel's own answer includes ancestors above our mount root.
            hier = self.read_stat().get("hierarchical_memory_limit")
            if hier is not None and hier < UNLIMITED_BYTES and (best is None or hier < best):
                best, source = hier, "(an ancestor above the cgroup mount root)"
        return LimitInfo(best, source, tuple(limited))

    def events(self) -> dict[str, int]:
        """OOM counters: v2 memory.events, v1 memory.oom_control."""
        return parse_flat_keyed(read_text(self.file(file_name("events", self.version))))

    def oom_kills(self) -> int:
        return self.events().get("oom_kill", 0)


# -- small readers ---------------------------------------------------------------------


def read_text(path: str) -> str:
    with open(path, encoding="ascii", errors="replace") as f:
        return f.read()


def parse_flat_keyed(text: str) -> dict[str, int]:
    """``key value`` lines (memory.stat, memory.events, memory.oom_control)."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2:
            try:
                out[parts[0]] = int(parts[1])
            except ValueError:
                continue
    return out


def parse_limit(text: str) -> int | None:
    """A limit file's value in bytes, None when it means "no limit"."""
    text = text.strip()
    if text == "max":
        return None
    value = int(text)
    return None if value >= UNLIMITED_BYTES else value


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo (three octal digits)
    out = []
    i = 0
    while i < len(field):
        code = field[i + 1 : i + 4]
        if field[i] == "\\" and len(code) == 3 and all(c in "01234567" for c in code):
            out.append(chr(int(code, 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def parse_mountinfo(text: str, rootfs: str = "/") -> list[Mount]:
    """The cgroup mounts in a mountinfo file."""
    mounts: list[Mount] = []
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        fields = left.split()
        tail = right.split()
        if len(fields) < 5 or len(tail) < 3:
            continue
        fstype, options = tail[0], tail[2]
        if fstype not in ("cgroup", "cgroup2"):
            continue
        root = _unescape(fields[3])
        mount_point = _unescape(fields[4])
        if rootfs not in ("", "/"):
            mount_point = os.path.join(rootfs, mount_point.lstrip("/"))
        controllers = frozenset(o for o in options.split(",") if o not in ("rw", "ro"))
        mounts.append(Mount(2 if fstype == "cgroup2" else 1, root, mount_point, controllers))
    return mounts


def parse_proc_cgroup(text: str) -> list[tuple[str, frozenset[str], str]]:
    """``hierarchy-id:controllers:path`` lines of /proc/<pid>/cgroup."""
    out = []
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        controllers = frozenset(c for c in parts[1].split(",") if c)
        out.append((parts[0], controllers, parts[2]))
    return out


def _relative(path: str, root: str) -> str | None:
    """``path`` below mount ``root``, or None when it lies outside it."""
    if root == "/":
        return path
    if path == root:
        return "/"
    if path.startswith(root.rstrip("/") + "/"):
        return path[len(root.rstrip("/")) :]
    return None


def _pick_mount(mounts: list[Mount], path: str) -> tuple[Mount, str] | None:
    # Several bind mounts of one hierarchy can exist: the longest matching root wins.
    best: tuple[Mount, str] | None = None
    for m in mounts:
        rel = _relative(path, m.root)
        if rel is None:
            continue
        if best is None or len(m.root) > len(best[0].root):
            best = (m, rel)
    return best


def _v2_has_memory(directory: str, mount: Mount) -> bool:
    # memory.current exists only where the parent delegates the memory controller;
    # the hierarchy root has memory.stat but no memory.current.
    return os.path.exists(os.path.join(directory, "memory.current")) or (
        os.path.normpath(directory) == os.path.normpath(mount.mount_point)
        and "memory" in _controllers_at(directory)
    )


def _controllers_at(directory: str) -> set[str]:
    try:
        return set(read_text(os.path.join(directory, "cgroup.controllers")).split())
    except OSError:
        return set()


def _is_zombie(procfs: str, pid: int) -> bool:
    try:
        text = read_text(os.path.join(procfs, str(pid), "stat"))
    except OSError:
        return False
    tail = text[text.rfind(")") + 2 :].split()
    return bool(tail) and tail[0] in ("Z", "X")


def find_process_cgroup(
    pid: int | None = None, *, procfs: str = "/proc", rootfs: str = "/", require_accounting: bool = True
) -> MemoryCgroup:
    """The memory cgroup of ``pid`` (default: this process).

    The path comes from ``/proc/<pid>/cgroup``, which the kernel prints relative to *our*
    cgroup namespace; so it is resolved against *our* mounts (``/proc/self/mountinfo``), never
    the target's: a process in a container (another mount namespace) has its own mounts,
    whose paths mean nothing on our filesystem.

    ``require_accounting=False`` also accepts the cgroup v2 root, which has the memory
    controller but no memory.current / memory.max: useful to make child cgroups under it.
    """
    who = "self" if pid is None else str(pid)
    try:
        cgroup_text = read_text(os.path.join(procfs, who, "cgroup"))
        mountinfo_text = read_text(os.path.join(procfs, "self", "mountinfo"))
    except PermissionError:
        raise CgroupNotFound(
            f"pid={pid}: permission denied reading its cgroup; run as root or as its owner"
        ) from None
    except (FileNotFoundError, ProcessLookupError):
        if pid is not None:
            raise CgroupNotFound(f"pid={pid}: no such process; pass the pid of a running process") from None
        raise CgroupNotFound(f"{procfs}/self/cgroup is missing: is {procfs} a mounted procfs?") from None
    except OSError as exc:
        raise CgroupNotFound(f"pid={pid}: cannot read its cgroup ({exc.strerror or exc})") from None
    if pid is not None and _is_zombie(procfs, pid):
        # An exited task is moved to the root cgroup: its /proc/<pid>/cgroup would name the root.
        raise CgroupNotFound(f"pid={pid}: the process has exited (a zombie has no cgroup); pass a running process")
    entries = parse_proc_cgroup(cgroup_text)
    mounts = parse_mountinfo(mountinfo_text, rootfs)

    v1_memory = [e for e in entries if "memory" in e[1]]
    if v1_memory:
        path = v1_memory[0][2]
        candidates = [m for m in mounts if m.version == 1 and "memory" in m.controllers]
        version = 1
    else:
        unified = [e for e in entries if e[0] == "0" and not e[1]]
        if not unified:
            raise CgroupNotFound(
                f"{procfs}/{who}/cgroup lists no memory controller and no cgroup v2 entry: "
                "this kernel has no memory cgroup for the process"
            )
        path = unified[0][2]
        candidates = [m for m in mounts if m.version == 2]
        version = 2
    if path.endswith(" (deleted)"):
        path = path[: -len(" (deleted)")]
    picked = _pick_mount(candidates, path)
    if picked is None:
        raise CgroupNotFound(
            f"memory cgroup {path!r} (cgroup v{version}) is not below any cgroup mount in "
            f"{procfs}/{who}/mountinfo: mount the cgroup filesystem "
            "(mount -t cgroup2 none /sys/fs/cgroup) or pass cgroup= explicitly"
        )
    mount, rel = picked
    directory = os.path.normpath(os.path.join(mount.mount_point, rel.lstrip("/")))
    if not os.path.isdir(directory):
        raise CgroupNotFound(
            f"memory cgroup {path!r} of {'this process' if pid is None else f'pid {pid}'} has no directory "
            f"{directory} (removed, or not visible from here); pass cgroup= explicitly"
        )
    if version == 2 and not os.path.exists(os.path.join(directory, "memory.current")):
        is_root = path == "/" and mount.root == "/" and "memory" in _controllers_at(directory)
        if is_root and not require_accounting:
            return MemoryCgroup(version, path, directory, mount)
        if is_root:
            raise CgroupNotFound(
                f"the process is in the cgroup v2 root ({directory}), which has no memory.current or "
                "memory.max and no limit: run it in a child cgroup (a systemd unit, a container) or pass cgroup="
            )
        raise CgroupNotFound(
            f"cgroup {directory} has no memory controller: enable it in the parent "
            "(echo +memory > <parent>/cgroup.subtree_control)"
        )
    return MemoryCgroup(version, path, directory, mount)


def cgroup_from_directory(
    directory: str, *, procfs: str = "/proc", rootfs: str = "/"
) -> MemoryCgroup:
    """A memory cgroup named by its directory (``/sys/fs/cgroup/memory/app``)."""
    if not isinstance(directory, (str, os.PathLike)):
        raise CgroupNotFound(f"cgroup={directory!r}: pass a cgroup directory path as str")
    directory = os.path.normpath(os.path.abspath(os.fspath(directory)))
    if not os.path.isdir(directory):
        raise CgroupNotFound(
            f"cgroup={directory!r}: no such directory; create it first "
            "(mkdir under the memory cgroup mount), or leave it out for this process's own cgroup"
        )
    mounts = parse_mountinfo(read_text(os.path.join(procfs, "self", "mountinfo")), rootfs)
    containing = [
        m
        for m in mounts
        if directory == os.path.normpath(m.mount_point)
        or directory.startswith(os.path.normpath(m.mount_point) + os.sep)
    ]
    if not containing:
        raise CgroupNotFound(
            f"cgroup={directory!r} is outside every cgroup mount; pass a directory under "
            "/sys/fs/cgroup (v2) or /sys/fs/cgroup/memory (v1)"
        )
    mount = max(containing, key=lambda m: len(m.mount_point))
    rel = os.path.relpath(directory, mount.mount_point)
    rel_path = "/" if rel == "." else "/" + rel
    path = os.path.normpath(mount.root.rstrip("/") + rel_path) if mount.root != "/" else rel_path
    if mount.version == 1 and "memory" not in mount.controllers:
        raise CgroupNotFound(
            f"cgroup={directory!r} is in a v1 hierarchy without the memory controller "
            f"({','.join(sorted(mount.controllers))}); use the directory under the memory mount"
        )
    if mount.version == 2 and not _v2_has_memory(directory, mount):
        raise CgroupNotFound(
            f"cgroup={directory!r} has no memory controller: enable it in the parent "
            "(echo +memory > <parent>/cgroup.subtree_control)"
        )
    return MemoryCgroup(mount.version, path, directory, mount)
