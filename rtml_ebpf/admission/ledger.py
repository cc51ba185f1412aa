"""The reservation ledger: in-flight memory reservations shared by every process of a cgroup.

Workers of one service (gunicorn/uWSGI pre-fork, ``uvicorn --workers``, multiprocessing)
live in one memory cgroup and share its headroom, so each must see what the others have
admitted but not yet allocated. The ledger is a small file named by the cgroup id, mapped by
every process: one row per process, written only by that process (its reservations, requests
in flight, requests still learning their cost). An admission decision claims its request in its
own row, then reads the others' (``ledger_fast``: no lock, no system call), so two processes
never spend the same headroom. The ``flock`` is for joining, reaping and tools (:meth:`lock`).

Where: a directory private to the uid (0700, owner checked, every component opened with
O_NOFOLLOW: see ``_private_dir``), never a predictable name in a world-writable place, where
another uid could plant a file, a symlink or a directory and switch the shared budget off
(issue 21). Root uses /run/rtml-ebpf-ledger first (only root can create anything in /run);
others $XDG_RUNTIME_DIR; then /dev/shm/rtml-ebpf-<uid>, then the temp dir's. A place squatted
by another uid is refused with a logged error and the next one is used: every worker of a
service takes the same decision, so they still meet in one file. Why a named file and not a
memfd: gunicorn without --preload and ``uvicorn --workers`` (spawn) start workers that share
no ancestor holding the ledger, so they need a rendezvous by name; a private directory gives
one that no other uid can reach.

Space is allocated when the file is made (``posix_fallocate``): a full filesystem is an error
at start, not a SIGBUS on the first write to the mapping. A deleted file (``rm``) is noticed
within ``CHECK_INTERVAL`` (its link count is 0) and replaced, with this process's reservations
re-published, so the budget never splits silently. Each process holds a shared lock on the
file (an OFD lock, which follows the open file like flock); the last process out gets the
exclusive one and removes the file.

A process that dies (SIGKILL, OOM kill, crash) cannot clear its row: every process reaps
rows whose pid is gone, a zombie, or reused (start time differs) at most every
``REAP_INTERVAL`` seconds while it has requests in flight (its publisher thread, off the request
path, ``ledger_reap``), so a killed worker's reservations never outlive it by much more than that.
"""

from __future__ import annotations

import atexit
import errno
import fcntl
import logging
import mmap
import os
import stat
import struct
import threading
import time
import weakref
from typing import NamedTuple

from .._private_dir import open_place
from ..errors import ConfigError
from . import forks, ledger_fast
from .ledger_fast import Others
from .ledger_files import ofd_lock as _ofd_lock
from .ledger_files import remove_beside, sweep
from .ledger_files import same_file as _same_file
from .ledger_layout import (
    FIELDS,
    H_USED,
    HEADER,
    INFLIGHT,
    LARGEST,
    LEARNING,
    PER_KIB,
    PID,
    RESERVED,
    ROWS,
    SIZE,
    UPDATED,
)
from .ledger_reap import reap, take_row

log = logging.getLogger("rtml_ebpf")

REAP_INTERVAL = 0.5
CHECK_INTERVAL = 0.5  # how often a process looks whether its ledger file was deleted


class Totals(NamedTuple):
    """The sums of a ledger's live rows."""

    reserved: int
    inflight: int
    learning: int
    largest: int


def ledger_dir() -> str:
    """The private directory this process's ledgers live in (made if missing)."""
    fd, where = open_place()
    os.close(fd)
    return where.rstrip("/")


def file_name(cgroup_id: int) -> str:
    return f"{cgroup_id}.ledger"


def read_totals(cgroup_id: int, directory: str | None = None) -> Totals | None:
    """The sums of the live rows of a cgroup's ledger, read without joining it (for tools and
    benchmarks), or None when there is none. Same uid only: the file is private."""
    try:
        dfd, _ = open_place(directory)
    except ConfigError:
        return None
    try:
        fd = os.open(file_name(cgroup_id), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
    except OSError:
        return None
    finally:
        os.close(dfd)
    with os.fdopen(fd, "rb") as f:
        data = f.read(SIZE)
    if len(data) < SIZE:
        return None
    q = struct.unpack(f"{SIZE // 8}q", data)
    live = [HEADER + r * FIELDS for r in range(ROWS) if q[HEADER + r * FIELDS + PID]]
    return Totals(sum(q[b + RESERVED] for b in live), sum(q[b + INFLIGHT] for b in live),
                  sum(q[b + LEARNING] for b in live), max((q[b + LARGEST] for b in live), default=0))


_open_ledgers: weakref.WeakSet[Ledger] = weakref.WeakSet()
_exit_hook_pid = 0


def _close_all() -> None:
    """At exit: leave every ledger (the last process out removes the file)."""
    for ledger in list(_open_ledgers):
        try:
            ledger.close()
        except Exception:  # noqa: BLE001 - exiting anyway
            pass


def _register_exit() -> None:
    """Once per process: atexit covers plain and forked (gunicorn) processes; multiprocessing
    children (``uvicorn --workers``, spawn or fork) end with os._exit after multiprocessing's
    own finalizers, which a forked child starts with empty, so register there too."""
    global _exit_hook_pid
    if _exit_hook_pid == os.getpid():
        return
    _exit_hook_pid = os.getpid()
    atexit.register(_close_all)
    from multiprocessing.util import Finalize

    Finalize(None, _close_all, exitpriority=10)


class Ledger:
    """This process's view of one cgroup's ledger. Reopened after a fork: flock belongs to the
    open file description, which a forked child would otherwise share with its parent."""

    def __init__(self, cgroup_id: int, directory: str | None = None) -> None:
        if not isinstance(cgroup_id, int) or cgroup_id <= 0:
            raise ConfigError(f"cgroup_id={cgroup_id!r}: pass the positive id of a memory cgroup")
        self.cgroup_id = cgroup_id
        self._directory = directory
        self.path = ""  # known once opened
        self._pid = -1
        self._fd = -1
        self._dfd = -1
        self._mm: mmap.mmap | None = None
        self._rows: memoryview | None = None
        self._row = -1
        self._start = 0
        self._last_reap = 0.0
        self._next_check = 0.0
        self._lock = threading.Lock()

    # -- opening (per process) ------------------------------------------------------------
    def _open_file(self) -> tuple[int, int, str]:
        """(dir fd, file fd, path) of the current file, with this process's shared lock on it.
        A file removed between our open and our lock (its last user left) is opened again."""
        name = file_name(self.cgroup_id)
        for _ in range(20):
            dfd, where = open_place(self._directory)
            path = os.path.join(where, name)
            try:
                fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dfd)
            except OSError as exc:
                os.close(dfd)
                raise ConfigError(f"ledger {path}: {exc.strerror or exc}; remove it (another user may have "
                                  "planted it) or set RTML_LEDGER_DIR to a private directory") from None
            try:
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
                    raise ConfigError(f"ledger {path}: not a private regular file of uid {os.geteuid()}; remove it "
                                      "(another user may have planted it)")
                _ofd_lock(fd, fcntl.F_RDLCK, wait=True)  # waits while a last user removes it
                if os.fstat(fd).st_nlink > 0 and _same_file(dfd, name, fd):
                    return dfd, fd, path
            except BaseException:
                os.close(fd)
                os.close(dfd)
                raise
            os.close(fd)
            os.close(dfd)
        raise ConfigError(f"ledger {path}: removed each time it was opened; is something deleting it?")

    def _open(self) -> None:
        dfd, fd, path = self._open_file()
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                try:
                    # Blocks now, not a SIGBUS at the first write to a page of a full filesystem.
                    os.posix_fallocate(fd, 0, SIZE)
                except OSError as exc:
                    raise ConfigError(f"ledger {path}: cannot allocate {SIZE} bytes ({exc.strerror or exc}): "
                                      f"free space in {os.path.dirname(path)} or set RTML_LEDGER_DIR") from None
                mm = mmap.mmap(fd, SIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
                rows = memoryview(mm).cast("q")
                try:
                    row, start = take_row(rows, path)
                    self._last_reap = time.monotonic()
                except BaseException:
                    rows.release()
                    mm.close()
                    raise
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        except BaseException:
            os.close(fd)
            os.close(dfd)
            raise
        self._fd, self._dfd, self._mm, self._rows, self._row, self._start = fd, dfd, mm, rows, row, start
        self._pid = forks.pid
        self.path = path
        self._next_check = time.monotonic() + CHECK_INTERVAL
        _open_ledgers.add(self)
        _register_exit()
        sweep(dfd, file_name(self.cgroup_id))  # files of services killed whole (ledger_files.py)

    def open(self) -> None:
        """Join the ledger now (else at the first use): raises ConfigError when it cannot."""
        self._ensure()

    def _ensure(self) -> memoryview:
        if self._pid != forks.pid:
            # A forked child: drop the parent's view and fd copies (not its row, nor its lock:
            # the parent still owns them) and take a row of its own.
            self._drop()
            self._open()
        assert self._rows is not None
        return self._rows

    def _relink(self) -> None:
        """Our file was deleted (``rm``): the others no longer see our row. Join the current file
        (made anew if no one did yet) and publish our reservations there."""
        rows = self._rows
        assert rows is not None
        base = HEADER + self._row * FIELDS
        mine = [rows[base + RESERVED], rows[base + INFLIGHT], rows[base + LEARNING], rows[base + LARGEST],
                rows[base + PER_KIB]]
        old = self.path
        self._drop()
        self._open()
        self.publish(mine[0], mine[1], mine[2], mine[3], mine[4])
        log.warning("rtml-ebpf: the admission ledger %s was deleted; joined %s again and re-published this "
                    "process's reservations (%d bytes, %d in flight)", old, self.path, mine[0], mine[1])

    def _check_linked(self) -> None:
        """At most every CHECK_INTERVAL (one fstat): is our file still the one others open?"""
        now = time.monotonic()
        if now < self._next_check or self._fd < 0:
            return
        self._next_check = now + CHECK_INTERVAL
        if os.fstat(self._fd).st_nlink == 0:
            self._relink()

    # -- rows -------------------------------------------------------------------------------
    def _reap(self, rows: memoryview) -> None:
        reap(rows, self._row)
        self._last_reap = time.monotonic()

    def totals(self) -> tuple[int, int, int, int]:
        """(reserved bytes, requests in flight, requests learning, largest estimate known) of the
        *other* processes. Call with :meth:`lock` held."""
        rows = self._ensure()
        if time.monotonic() - self._last_reap >= REAP_INTERVAL:
            self._reap(rows)
        own = HEADER + self._row * FIELDS
        body = rows[HEADER : HEADER + rows[H_USED] * FIELDS]
        reserved = sum(body[RESERVED::FIELDS]) - rows[own + RESERVED]
        inflight = sum(body[INFLIGHT::FIELDS]) - rows[own + INFLIGHT]
        learning = sum(body[LEARNING::FIELDS]) - rows[own + LEARNING]
        return reserved, inflight, learning, max(body[LARGEST::FIELDS], default=0)

    def claim(self, reserved: int, inflight: int, learning: int, largest: int, per_kib: int) -> Others:
        """The request path (``ledger_fast``): write this process's row as it is once the request
        is admitted, then, after a full fence, the others' sums (a refusal claims its row back).
        No lock, no system call: callers serialise their own row (Admission holds its lock)."""
        rows = self._rows if self._pid == forks.pid else self._ensure()
        return ledger_fast.claim(rows, self._row, reserved, inflight, learning, largest, per_kib)  # type: ignore[arg-type]

    def look(self) -> Others:
        """The same sums without a claim (what a route not learned here may guess from)."""
        return ledger_fast.others(self._ensure(), self._row)

    def upkeep(self) -> None:
        """Off the request path (the publisher thread): reap dead processes' rows at most every
        REAP_INTERVAL, and notice a deleted file (:meth:`lock` does both)."""
        if time.monotonic() - self._last_reap < REAP_INTERVAL:
            return
        self.lock()
        try:
            assert self._rows is not None
            self._reap(self._rows)
        finally:
            self.unlock()

    def publish(self, reserved: int, inflight: int, learning: int, largest: int | None = None,
                per_kib: int | None = None) -> None:
        """This process's row. Single writer: no file lock needed (aligned 8-byte stores)."""
        rows = self._ensure()
        if time.monotonic() >= self._next_check and self._lock.acquire(blocking=False):
            # From the publisher thread (not under lock()): look whether the file was deleted.
            try:
                self._check_linked()
                rows = self._ensure()
            finally:
                self._lock.release()
        base = HEADER + self._row * FIELDS
        if largest is not None:
            rows[base + LARGEST] = max(0, int(largest))
        if per_kib is not None:
            rows[base + PER_KIB] = max(0, int(per_kib))
        rows[base + RESERVED] = max(0, int(reserved))
        rows[base + INFLIGHT] = inflight
        rows[base + LEARNING] = learning
        rows[base + UPDATED] = time.monotonic_ns()

    def lock(self) -> None:
        if self._pid != forks.pid and self._pid != -1:
            self._lock = threading.Lock()  # a forked child must not inherit a held lock
        self._lock.acquire()
        try:
            self._ensure()
            self._check_linked()
            fcntl.flock(self._fd, fcntl.LOCK_EX)
        except BaseException:
            self._lock.release()
            raise

    def unlock(self) -> None:
        try:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            self._lock.release()

    def close(self) -> None:
        """Clear this process's row and unmap; the last process out removes the file."""
        _open_ledgers.discard(self)
        if self._pid == os.getpid() and self._rows is not None:
            try:
                base = HEADER + self._row * FIELDS
                for i in (RESERVED, INFLIGHT, LEARNING, LARGEST, PER_KIB):
                    self._rows[base + i] = 0
                self._rows[base + PID] = 0
            except (ValueError, OSError):
                pass
            try:
                # The exclusive lock is ours only when no other process holds the file: then
                # remove it, if the name still leads to it (not to a newer file). Our own read lock
                # goes first: two processes leaving together (uvicorn's workers on SIGTERM) each
                # failed to upgrade while the other still held its read lock, and neither removed it.
                _ofd_lock(self._fd, fcntl.F_UNLCK, wait=False)
                if _ofd_lock(self._fd, fcntl.F_WRLCK, wait=False) and _same_file(self._dfd, file_name(
                        self.cgroup_id), self._fd):
                    os.unlink(file_name(self.cgroup_id), dir_fd=self._dfd)
                    remove_beside(self._dfd, file_name(self.cgroup_id))
            except OSError as exc:
                log.debug("rtml-ebpf: ledger %s not removed: %s", self.path, exc)
        self._drop()

    def _drop(self) -> None:
        """Forget the mapping and the fds (closing the last copy of the fd drops our locks)."""
        rows, mm, fd, dfd = self._rows, self._mm, self._fd, self._dfd
        self._rows = self._mm = None
        self._fd = self._dfd = self._pid = -1
        if rows is not None:
            rows.release()
        if mm is not None:
            try:
                mm.close()
            except BufferError:
                pass
        for f in (fd, dfd):
            if f >= 0:
                try:
                    os.close(f)
                except OSError as exc:
                    if exc.errno != errno.EBADF:
                        raise
