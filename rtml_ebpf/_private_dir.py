"""Private per-uid directories in places other users share (/dev/shm, /tmp), opened safely.

A file with a predictable name in a world-writable directory can be planted by anyone: an
empty file, a symlink to somewhere else, a directory. So shared files (the admission ledger)
live in a directory private to the uid: mode 0700, owned by the uid, every path component
opened with ``O_NOFOLLOW`` from the root down, each checked to be a directory that only root
or this uid can change (or a sticky one, like /tmp, where others cannot touch our entries).
A name squatted by another uid is refused with an error naming it and its owner: the caller
then tries its next place. What a squatter can still do is take the *name* in a shared place,
which is why root uses a root-only place first (/run), where no other uid can create anything.
"""

from __future__ import annotations

import logging
import os
import stat
import tempfile

from .errors import ConfigError

log = logging.getLogger("rtml_ebpf")
ROOT_PLACE = "/run"  # only root can create here: no other uid can squat a name
SHARED_PLACES = ["/dev/shm"]  # memory, shared by the host or the pod (IPC namespace)
_warned: set[str] = set()


class UnsafePlace(ConfigError):
    """A directory that another user could change, or has taken."""


_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _trusted(st: os.stat_result, euid: int) -> bool:
    """Only root or this uid can add or replace entries (others may in a sticky directory, but
    not touch ours)."""
    if st.st_uid not in (0, euid):
        return False
    return not st.st_mode & 0o022 or bool(st.st_mode & stat.S_ISVTX)


def open_walk(path: str) -> int:
    """An fd of the directory ``path``: resolved once (system links such as /dev/shm -> /run/shm
    are the operator's), then opened component by component with O_NOFOLLOW, each checked."""
    euid = os.geteuid()
    real = os.path.realpath(path)
    fd = os.open("/", _DIR_FLAGS)
    try:
        walked = ""
        for part in [p for p in real.split("/") if p]:
            walked += "/" + part
            try:
                nxt = os.open(part, _DIR_FLAGS, dir_fd=fd)
            except OSError as exc:
                raise UnsafePlace(f"{walked}: {exc.strerror} (a symlink or not a directory?)") from None
            os.close(fd)
            fd = nxt
            st = os.fstat(fd)
            if not _trusted(st, euid):
                raise UnsafePlace(f"{walked}: uid {st.st_uid} owns it and it is writable by others "
                                  f"(mode {stat.S_IMODE(st.st_mode):o}) without the sticky bit")
        return fd
    except BaseException:
        os.close(fd)
        raise


def private_dir(parent: str, name: str | None) -> int:
    """An fd of ``parent/name``, made mode 0700 if missing, and checked to be a real directory
    of this uid that nobody else can enter. ``name=None``: ``parent`` itself must be that."""
    euid = os.geteuid()
    pfd = open_walk(parent)
    if name is None:
        fd, where = pfd, os.path.realpath(parent)
    else:
        where = os.path.join(os.path.realpath(parent), name)
        try:
            try:
                os.mkdir(name, 0o700, dir_fd=pfd)
            except FileExistsError:
                pass
            try:
                fd = os.open(name, _DIR_FLAGS, dir_fd=pfd)
            except OSError as exc:
                raise UnsafePlace(f"{where} is {_kind(name, pfd)}, not this library's private directory: another "
                                  f"user may have planted it; remove it ({exc.strerror})") from None
        finally:
            os.close(pfd)
    try:
        st = os.fstat(fd)
        if st.st_uid != euid:
            raise UnsafePlace(f"{where} belongs to uid {st.st_uid}, not to uid {euid}: another user made it "
                              "(squatting the name); remove it, or set RTML_LEDGER_DIR to a private directory")
        if st.st_mode & 0o077:
            if name is None:
                raise UnsafePlace(f"{where}: mode {stat.S_IMODE(st.st_mode):o}, others may enter it; "
                                  "chmod 700, or name a private directory")
            os.fchmod(fd, 0o700)  # ours (made under a loose umask, or by us before): close it
        return fd
    except BaseException:
        os.close(fd)
        raise


def _kind(name: str, dir_fd: int) -> str:
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except OSError:
        return "unreadable"
    if stat.S_ISLNK(st.st_mode):
        return f"a symlink of uid {st.st_uid}"
    return f"{'a directory' if stat.S_ISDIR(st.st_mode) else 'not a directory'} of uid {st.st_uid}"


def places(uid: int | None = None) -> list[tuple[str, str | None]]:
    """Where this uid's ledgers may live, best first: (parent, private subdirectory or None)."""
    uid = os.geteuid() if uid is None else uid
    mine = f"rtml-ebpf-{uid}"
    explicit = os.environ.get("RTML_LEDGER_DIR", "")
    if explicit:
        return [(explicit, _subdir(explicit, mine))]
    out: list[tuple[str, str | None]] = []
    if uid == 0:
        out.append((ROOT_PLACE, "rtml-ebpf-ledger"))
    else:
        runtime = os.environ.get("XDG_RUNTIME_DIR", "")
        if runtime:
            out.append((runtime, "rtml-ebpf-ledger"))
    out += [(place, mine) for place in SHARED_PLACES] + [(tempfile.gettempdir(), mine)]
    return out


def _subdir(directory: str, mine: str) -> str | None:
    """An explicit directory private to us is used as is; a shared one gets our subdirectory."""
    try:
        st = os.stat(directory)
    except OSError:
        return None  # reported when opened
    return None if st.st_uid == os.geteuid() and not st.st_mode & 0o077 else mine


def open_place(directory: str | None = None) -> tuple[int, str]:
    """An fd and the path of the first usable private directory; squatted ones are logged."""
    candidates = [(directory, _subdir(directory, f"rtml-ebpf-{os.geteuid()}"))] if directory else places()
    reasons = []
    for parent, name in candidates:
        if not os.path.isdir(parent) or (not os.access(parent, os.W_OK) and name is not None
                                         and not os.path.isdir(os.path.join(parent, name))):
            reasons.append(f"{parent}: not a writable directory")
            continue
        try:
            return private_dir(parent, name), os.path.join(os.path.realpath(parent), name or "")
        except (UnsafePlace, OSError) as exc:
            reason = str(exc) if isinstance(exc, UnsafePlace) else f"{parent}/{name or ''}: {exc.strerror or exc}"
            reasons.append(reason)
            if reason not in _warned:
                _warned.add(reason)
                log.error("rtml-ebpf: refusing a ledger place: %s; trying the next one", reason)
    raise ConfigError("no safe place for the admission ledger: " + "; ".join(reasons) +
                      " (set RTML_LEDGER_DIR to a directory of this uid, mode 700)")
