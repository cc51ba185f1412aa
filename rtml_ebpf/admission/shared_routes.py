"""Route estimates shared by the processes of a cgroup, beyond their own lifetimes.

Each process learns its routes' costs from what the kernel charged to its requests
(``estimator``). A worker that has not learned a route yet reserves the cgroup's largest figure
(a guess, one at a time) or, when no process knows anything, learns it one request at a time in
the whole cgroup. Workers that are recycled (gunicorn ``--max-requests``, a crashed worker
restarted) started from nothing each time: with ``--max-requests 20`` a flooded service spent its
life learning and served a tenth of what it served without recycling (adversarial review D9).

So every process publishes its learned routes to a small file beside the cgroup's ledger
(``<cgroup id>.routes``, the same private directory), from the publisher thread at most every
WRITE_INTERVAL; a process meeting a route it has not learned reads the file (at most every
READ_INTERVAL, only while some route is unknown to it) and starts from what the others
learned, as if it had measured ``min_samples`` such requests itself; its own measurements then
replace them as its window fills. The file goes with the ledger (the last process out removes
both; the ledger sweep removes one whose ledger is gone). Never raises: a file that cannot be
read or written is ignored (the process learns by itself, as before).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Iterable
from typing import Any

from .._private_dir import open_place
from .estimator import CostEstimator, RouteEstimate

log = logging.getLogger("rtml_ebpf")

SUFFIX = ".routes"
WRITE_INTERVAL = 1.0
READ_INTERVAL = 1.0
MAX_ROUTES = 256
MAX_FILE = 256 << 10
MAX_CLASSES = 16

Entry = tuple[int, int, tuple[tuple[int, int], ...]]  # (estimate bytes, samples, ((class size, bytes), ...))


def file_name(cgroup_id: int) -> str:
    return f"{cgroup_id}{SUFFIX}"  # ledger_files.py removes it with the ledger


def _entry(value: Any) -> Entry | None:
    """A route's entry from the file, or None when it is not one (the file is this uid's, but a
    half-written or foreign one must not break admission)."""
    if not (isinstance(value, list) and len(value) == 3):
        return None
    est, samples, classes = value
    if not (isinstance(est, int) and isinstance(samples, int) and isinstance(classes, list)) or est < 0 or samples < 0:
        return None
    pairs = []
    for pair in classes[:MAX_CLASSES]:
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(x, int) and x >= 0 for x in pair)):
            return None
        pairs.append((pair[0], pair[1]))
    return est, samples, tuple(pairs)


class SharedRoutes:
    """One process's view of its cgroup's shared route estimates (thread-safe)."""

    def __init__(self, directory: str | None = None) -> None:
        self._directory = directory
        self._lock = threading.Lock()
        self._cgid = 0
        self._known: dict[str, Entry] = {}
        self._read_at = 0.0
        self._written_at = 0.0
        self._written: dict[str, Entry] = {}

    # -- the file ---------------------------------------------------------------------------
    def _read(self, dfd: int, cgid: int) -> dict[str, Entry]:
        try:
            fd = os.open(file_name(cgid), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
        except OSError:
            return {}
        try:
            data = os.read(fd, MAX_FILE + 1)
        except OSError:
            return {}
        finally:
            os.close(fd)
        if len(data) > MAX_FILE:
            return {}
        try:
            raw = json.loads(data)
        except ValueError:
            return {}
        if not isinstance(raw, dict):
            return {}
        out: dict[str, Entry] = {}
        for route, value in list(raw.items())[:MAX_ROUTES]:
            entry = _entry(value)
            if isinstance(route, str) and entry is not None:
                out[route] = entry
        return out

    def _write(self, dfd: int, cgid: int, entries: dict[str, Entry]) -> None:
        tmp = f".{file_name(cgid)}.{os.getpid()}.{threading.get_ident()}"
        data = json.dumps({r: [e[0], e[1], [list(p) for p in e[2]]] for r, e in entries.items()}).encode()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dfd)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
        os.replace(tmp, file_name(cgid), src_dir_fd=dfd, dst_dir_fd=dfd)  # readers see old or new, whole

    def _place(self) -> int | None:
        try:
            dfd, _ = open_place(self._directory)
        except Exception:  # noqa: BLE001 - no safe place: the ledger says so; here, learn alone
            return None
        return dfd

    # -- publishing (the publisher thread) ----------------------------------------------------
    def publish(self, cgid: int, routes: Iterable[RouteEstimate]) -> None:
        """This process's learned routes merged into the file, at most every WRITE_INTERVAL
        and only when they changed. Per route the entry with more samples wins."""
        mine = {r.route: (r.estimate, r.samples, r.by_size) for r in routes
                if not r.declared and r.estimate is not None}
        now = time.monotonic()
        with self._lock:
            if now < self._written_at + WRITE_INTERVAL or not mine:
                return
            entries: dict[str, Entry] = {k: (int(e), s, tuple(c[:MAX_CLASSES])) for k, (e, s, c) in mine.items()}
            if cgid == self._cgid and entries == self._written:
                return
            self._written_at = now
        dfd = self._place()
        if dfd is None:
            return
        try:
            merged = self._read(dfd, cgid)
            for route, entry in entries.items():
                old = merged.get(route)
                if old is None or entry[1] >= old[1]:
                    merged[route] = entry
            if len(merged) > MAX_ROUTES:
                merged = dict(sorted(merged.items(), key=lambda kv: -kv[1][1])[:MAX_ROUTES])
            self._write(dfd, cgid, merged)
            with self._lock:
                self._written = entries
                if cgid == self._cgid:
                    self._known = merged
        except OSError as exc:
            log.debug("rtml-ebpf: route estimates not shared (%s)", exc)
        finally:
            os.close(dfd)

    # -- a route this process has not learned (the request path, rarely) ----------------------
    def seed(self, cgid: int, estimator: CostEstimator, route: str) -> bool:
        """Teach ``estimator`` what the cgroup's processes learned of ``route``, if they did:
        ``min_samples`` observations of its estimate (and of each size class). True when it
        now knows the route. Reads the file at most every READ_INTERVAL."""
        now = time.monotonic()
        with self._lock:
            stale = cgid != self._cgid or now >= self._read_at + READ_INTERVAL
            if stale:
                self._cgid, self._read_at = cgid, now
        if stale:
            dfd = self._place()
            if dfd is not None:
                try:
                    known = self._read(dfd, cgid)
                finally:
                    os.close(dfd)
                with self._lock:
                    self._known = known
        with self._lock:
            entry = self._known.get(route)
        if entry is None or entry[1] < estimator.min_samples:
            return False
        est, _, classes = entry
        for _ in range(estimator.min_samples):
            if not classes:
                estimator.observe(route, est)
            for size, cost in classes:  # a sized route: its classes (the route's window follows)
                estimator.observe(route, cost, size)
        log.debug("rtml-ebpf: %s starts from the cgroup's estimate (%d bytes)", route, est)
        return True
