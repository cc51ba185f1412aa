"""The reservation ledger: in-flight memory reservations shared by every process of a cgroup.

Workers of one service (gunicorn/uWSGI pre-fork, ``uvicorn --workers``, multiprocessing)
live in one memory cgroup and share its headroom, so each must see what the others have
admitted but not yet allocated. The ledger is a small file in ``/dev/shm`` named by the
cgroup id and the uid, mapped by every process: one row per process, written only by that
process (its reservations, requests in flight, requests still learning their cost). An
admission decision reads every row under an exclusive ``flock`` so two processes never
spend the same headroom.

A process that dies (SIGKILL, OOM kill, crash) cannot clear its row: every process reaps
rows whose pid is gone, a zombie, or reused (start time differs) at most every
``REAP_INTERVAL`` seconds, so a killed worker's reservations never outlive it by more than
that. The file is created mode 0600 and opened with O_NOFOLLOW: another user cannot read or
write it, nor point it elsewhere.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import stat
import threading
import time

from .errors import ConfigError

MAGIC = 0x52544D4C4C454447  # "RTMLLEDG"
VERSION = 1
ROWS = 128  # processes of one cgroup that can share a ledger
FIELDS = 8  # int64 per row
PID, START, RESERVED, INFLIGHT, LEARNING, UPDATED, LARGEST = range(7)  # LARGEST: largest known estimate
HEADER = 8  # int64 of header: magic, version, rows, rows in use (high-water mark), ...
H_USED = 3
SIZE = (HEADER + ROWS * FIELDS) * 8
REAP_INTERVAL = 0.5


def ledger_dir() -> str:
    """/dev/shm (memory, shared by every process of the host or container), else the temp dir."""
    for candidate in (os.environ.get("RTML_LEDGER_DIR", ""), "/dev/shm"):
        if candidate and os.path.isdir(candidate) and os.access(candidate, os.W_OK):
            return candidate
    import tempfile

    return tempfile.gettempdir()


def process_start_time(pid: int) -> int | None:
    """Field 22 of /proc/<pid>/stat (clock ticks since boot), None when gone or a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            text = f.read()
    except OSError:
        return None
    fields = text[text.rfind(b")") + 2 :].split()
    if not fields or fields[0] == b"Z":
        return None
    return int(fields[19])


class Ledger:
    """This process's view of one cgroup's ledger. Reopened after a fork: flock belongs to the
    open file description, which a forked child would otherwise share with its parent."""

    def __init__(self, cgroup_id: int, directory: str | None = None) -> None:
        if not isinstance(cgroup_id, int) or cgroup_id <= 0:
            raise ConfigError(f"cgroup_id={cgroup_id!r}: pass the positive id of a memory cgroup")
        self.path = os.path.join(directory or ledger_dir(), f"rtml-ebpf-{os.geteuid()}-{cgroup_id}.ledger")
        self._pid = -1
        self._fd = -1
        self._mm: mmap.mmap | None = None
        self._rows: memoryview | None = None
        self._row = -1
        self._start = 0
        self._last_reap = 0.0
        self._lock = threading.Lock()

    # -- opening (per process) ------------------------------------------------------------
    def _open(self) -> None:
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(self.path, flags, 0o600)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
                raise ConfigError(
                    f"ledger {self.path}: not a private regular file of uid {os.geteuid()}; remove it "
                    "(another user may have planted it)"
                )
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                if st.st_size < SIZE:
                    os.ftruncate(fd, SIZE)
                mm = mmap.mmap(fd, SIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
                rows = memoryview(mm).cast("q")
                if rows[0] != MAGIC:
                    rows[1], rows[2], rows[0] = VERSION, ROWS, MAGIC
                elif rows[1] != VERSION or rows[2] != ROWS:
                    raise ConfigError(f"ledger {self.path}: written by another rtml-ebpf version; remove it")
                start = process_start_time(os.getpid()) or 0
                self._reap(rows)
                row = next((r for r in range(ROWS) if rows[HEADER + r * FIELDS + PID] == 0), -1)
                if row < 0:
                    raise ConfigError(f"ledger {self.path}: all {ROWS} rows are in use by live processes")
                base = HEADER + row * FIELDS
                for i in range(FIELDS):
                    rows[base + i] = 0
                rows[base + START] = start
                rows[base + PID] = os.getpid()
                rows[H_USED] = max(rows[H_USED], row + 1)  # readers sum rows below this mark only
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        except BaseException:
            os.close(fd)
            raise
        self._fd, self._mm, self._rows, self._row, self._start = fd, mm, rows, row, start
        self._pid = os.getpid()

    def _ensure(self) -> memoryview:
        if self._pid != os.getpid():
            # A forked child: drop the parent's view and fd copy (not its row: the parent
            # still owns it) and take a row of its own.
            if self._fd >= 0:
                os.close(self._fd)
            self._mm = self._rows = None
            self._fd = -1
            self._open()
        assert self._rows is not None
        return self._rows

    # -- rows -------------------------------------------------------------------------------
    def _reap(self, rows: memoryview) -> None:
        """Clear rows of processes that are gone (killed workers leave theirs behind)."""
        for r in range(ROWS):
            base = HEADER + r * FIELDS
            pid = rows[base + PID]
            if pid == 0 or (pid == os.getpid() and r == self._row):
                continue
            start = process_start_time(pid)
            if start is None or (rows[base + START] and start != rows[base + START]):
                rows[base + PID] = 0
                for i in range(1, FIELDS):
                    rows[base + i] = 0
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

    def publish(self, reserved: int, inflight: int, learning: int, largest: int | None = None) -> None:
        """This process's row. Single writer: no file lock needed (aligned 8-byte stores)."""
        rows = self._ensure()
        base = HEADER + self._row * FIELDS
        if largest is not None:
            rows[base + LARGEST] = max(0, int(largest))
        rows[base + RESERVED] = max(0, int(reserved))
        rows[base + INFLIGHT] = inflight
        rows[base + LEARNING] = learning
        rows[base + UPDATED] = time.monotonic_ns()

    def lock(self) -> None:
        if self._pid != os.getpid() and self._pid != -1:
            self._lock = threading.Lock()  # a forked child must not inherit a held lock
        self._lock.acquire()
        try:
            self._ensure()
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
        """Clear this process's row and unmap (the file stays for the other processes)."""
        if self._pid == os.getpid() and self._rows is not None:
            try:
                self.publish(0, 0, 0)
                self._rows[HEADER + self._row * FIELDS + PID] = 0
            except (ValueError, OSError):
                pass
        rows, mm, fd = self._rows, self._mm, self._fd
        self._rows = self._mm = None
        self._fd, self._pid = -1, -1
        if rows is not None:
            rows.release()
        if mm is not None:
            try:
                mm.close()
            except BufferError:
                pass
        if fd >= 0:
            try:
                os.close(fd)
            except OSError as exc:
                if exc.errno != errno.EBADF:
                    raise
