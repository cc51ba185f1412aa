"""Route costs shared by the processes of a cgroup, beyond their own lifetimes.

Each process learns its routes' costs from what the kernel charged to its requests
(``estimator``): ``min_samples`` measurements, one learning request at a time in the cgroup.
Workers that are recycled (gunicorn ``--max-requests``, a crashed worker restarted) started from
nothing each time, and a worker recycled before it had measured ``min_samples`` requests left
nothing behind: with ``--max-requests 20`` under a flood (the 503s count too) no worker ever
finished learning, and the service served a tenth of what it served without recycling
(adversarial review D9).

So every process adds the costs it measures (``note``) to a small file beside the cgroup's
ledger (``<cgroup id>.routes``, the same private directory: per route its most recent
MAX_SAMPLES measurements, with their body sizes), from the publisher thread; a process meeting a
route it has not learned reads the file (at most every READ_INTERVAL, only while a route is
unknown to it) and, when the cgroup's processes together measured ``min_samples`` requests of
it, replays those measurements into its estimator: it starts learned, from what its siblings and
predecessors measured, and its own measurements follow. The file goes with the ledger (the last
process out removes both; the ledger sweep removes one beside no ledger). Never raises: a file
that cannot be read or written is ignored (the process learns by itself, as before).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from typing import Any

from .._private_dir import open_place
from .estimator import CostEstimator

log = logging.getLogger("rtml_ebpf")

SUFFIX = ".routes"
PUBLISH_INTERVAL = 0.2
READ_INTERVAL = 1.0
MAX_ROUTES = 256
MAX_SAMPLES = 32  # per route: the estimator's default window
MAX_FILE = 512 << 10

Sample = tuple[int, int]  # (cost bytes, body bytes or 0)


def file_name(cgroup_id: int) -> str:
    return f"{cgroup_id}{SUFFIX}"  # ledger_files.py removes it with the ledger


def _samples(value: Any) -> list[Sample] | None:
    """A route's samples from the file, or None when they are not (the file is this uid's, but a
    half-written or foreign one must not break admission)."""
    if not isinstance(value, list):
        return None
    out: list[Sample] = []
    for pair in value[-MAX_SAMPLES:]:
        if not (isinstance(pair, list) and len(pair) == 2
                and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in pair)):
            return None
        out.append((pair[0], pair[1]))
    return out


class SharedRoutes:
    """One process's part in its cgroup's shared route costs (thread-safe)."""

    def __init__(self, directory: str | None = None) -> None:
        self._directory = directory
        self._lock = threading.Lock()
        self._pending: dict[str, list[Sample]] = {}  # measured here, not yet in the file
        self._cgid = 0
        self._known: dict[str, list[Sample]] = {}
        self._read_at = 0.0
        self._published_at = 0.0

    # -- the file ---------------------------------------------------------------------------
    def _read(self, dfd: int, cgid: int) -> dict[str, list[Sample]]:
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
        out: dict[str, list[Sample]] = {}
        for route, value in list(raw.items())[:MAX_ROUTES]:
            samples = _samples(value)
            if isinstance(route, str) and samples:
                out[route] = samples
        return out

    def _write(self, dfd: int, cgid: int, routes: dict[str, list[Sample]]) -> None:
        tmp = f".{file_name(cgid)}.{os.getpid()}.{threading.get_ident()}"
        data = json.dumps({r: [list(x) for x in v] for r, v in routes.items()}).encode()
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

    # -- this process's measurements ----------------------------------------------------------
    def note(self, route: str, cost: int, size: int | None) -> None:
        """A request of ``route`` measured here (the estimator learned it too): for the file."""
        with self._lock:
            pending = self._pending.get(route)
            if pending is None:
                if len(self._pending) >= MAX_ROUTES:
                    return
                pending = self._pending[route] = []
            pending.append((max(0, int(cost)), max(0, int(size or 0))))
            del pending[:-MAX_SAMPLES]

    def publish(self, cgid: int) -> None:
        """This process's new measurements added to the file (the publisher thread), at most
        every PUBLISH_INTERVAL. Several processes at once may lose one another's additions (the
        last rename wins): the cost is some samples, never a wrong one."""
        now = time.monotonic()
        with self._lock:
            if not self._pending or now < self._published_at + PUBLISH_INTERVAL:
                return
            pending, self._pending, self._published_at = self._pending, {}, now
        dfd = self._place()
        if dfd is None:
            return
        try:
            routes = self._read(dfd, cgid)
            for route, samples in pending.items():
                if route in routes or len(routes) < MAX_ROUTES:
                    routes[route] = (routes.get(route, []) + samples)[-MAX_SAMPLES:]
            self._write(dfd, cgid, routes)
        except OSError as exc:
            log.debug("rtml-ebpf: route costs not shared (%s)", exc)
        finally:
            os.close(dfd)

    # -- a route this process has not learned (the request path, rarely) ----------------------
    def seed(self, cgid: int, estimator: CostEstimator, route: str) -> bool:
        """Teach ``estimator`` what the cgroup's processes measured of ``route``, when they
        measured at least ``min_samples`` requests of it: True when it now knows the route.
        Reads the file at most every READ_INTERVAL."""
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
            samples = self._known.get(route)
            if not samples or len(samples) < estimator.min_samples:
                return False
            del self._known[route]  # replayed once: the file's, not ours, from here
        for cost, size in samples:
            estimator.observe(route, cost, size or None)
        log.debug("rtml-ebpf: %s starts from %d measurements of the cgroup's processes", route, len(samples))
        return True
