"""The ledger's files: the "still using it" lock, the name's check, and the sweep of files left by
services that were killed whole.

Every process using a ledger holds a shared OFD lock on the file's first byte; the last process
out takes the exclusive one and removes the file. A service killed whole (its last worker
OOM-killed or SIGKILLed, a container restarted in a new cgroup) removes nothing, and its file is
named by a cgroup id that does not come back: without a sweep such files stayed in tmpfs for
ever (262 of them on a test machine after a day of floods). A process joining a ledger removes
the files of its directory nobody holds, SWEEP_MAX at a time.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import stat
import struct

log = logging.getLogger("rtml_ebpf")

SUFFIX = ".ledger"
BESIDE = (".routes",)  # files that live and go with a cgroup's ledger (shared_routes.py)
SWEEP_MAX = 64  # files looked at per join: bounds the cost at a worker's start (~10 µs each)
_FLOCK = struct.Struct("hhqqi4x")  # struct flock on 64-bit Linux: type, whence, start, len, pid


def ofd_lock(fd: int, kind: int, wait: bool) -> bool:
    """An OFD lock on the file's first byte (the "still using it" mark). OFD locks belong to the
    open file, like flock, and do not conflict with the flock taken to join and to reap."""
    try:
        fcntl.fcntl(fd, fcntl.F_OFD_SETLKW if wait else fcntl.F_OFD_SETLK, _FLOCK.pack(kind, os.SEEK_SET, 0, 1, 0))
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EACCES):
            return False
        raise
    return True


def same_file(dfd: int, name: str, fd: int) -> bool:
    """Whether ``name`` in the directory still leads to the open file ``fd``."""
    try:
        st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
    except OSError:
        return False
    own = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)


def remove_beside(dfd: int, ledger_name: str) -> None:
    """The files that go with a ledger (its last process removed it, or the sweep). Never raises."""
    stem = ledger_name.removesuffix(SUFFIX)
    for suffix in BESIDE:
        try:
            os.unlink(stem + suffix, dir_fd=dfd)
        except OSError:
            pass


def sweep(dfd: int, keep: str) -> int:
    """Remove the ledger files in the directory ``dfd`` that no process holds (none has the
    shared lock), other than ``keep``; returns how many. A file someone is joining right now is
    safe: the joiner takes its shared lock and then checks the name still leads to its file, and
    opens a new one if not (ledger.py, ``_open_file``). Never raises."""
    removed = 0
    try:
        present = os.listdir(dfd)
    except OSError:
        return 0
    names = [n for n in present if n.endswith(SUFFIX) and n != keep][:SWEEP_MAX]
    ledgers = {n for n in present if n.endswith(SUFFIX)}
    for n in present:  # a file beside a ledger that is gone (its last process was killed)
        if n.endswith(BESIDE) and n.rsplit(".", 1)[0] + SUFFIX not in ledgers:
            remove_beside(dfd, n.rsplit(".", 1)[0] + SUFFIX)
    for name in names:
        try:
            fd = os.open(name, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=dfd)
        except OSError:
            continue
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
                continue
            if ofd_lock(fd, fcntl.F_WRLCK, wait=False) and same_file(dfd, name, fd):
                os.unlink(name, dir_fd=dfd)
                remove_beside(dfd, name)
                removed += 1
        except OSError as exc:
            log.debug("rtml-ebpf: ledger %s not swept: %s", name, exc)
        finally:
            os.close(fd)  # drops our lock
    if removed:
        log.info("rtml-ebpf: removed %d ledger files no process held (left by services killed whole)", removed)
    return removed
