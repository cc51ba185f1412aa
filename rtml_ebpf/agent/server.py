"""The node agent's loop and wiring: watches the node's memory cgroups with one loaded object and
serves each client its own cgroup's page over a Unix socket.

:class:`Agent` builds the parts (startup.py, programs.py, leases.py, oomfeed.py, conns.py,
handlers.py, httpd.py) and runs one selector loop: accepting, answering and the periodic work
(scan, upkeep, lease grace, OOM counters, readiness, metrics samples) interleave on its timers,
so nothing here locks. Nothing on the loop waits on a client: Unix-socket requests are whole
SEQPACKET messages read non-blocking, and HTTP (/metrics and the health probes) has a thread of
its own (httpd.py) that reads only what the loop publishes (an :class:`AgentView`, a
:class:`~.health.Health`).
"""

from __future__ import annotations

import logging
import os
import selectors
import signal
import stat
import time
from dataclasses import dataclass
from typing import Any

from ..ebpf.slots import Slots
from . import health as _health
from . import protocol
from .conns import Conn, Connections
from .handlers import Handlers
from .httpd import HttpServer
from .leases import Leases
from .metrics import AgentView, NodeMetrics
from .notify import Notifier
from .oomfeed import OomFeed
from .programs import NodePrograms, load_node
from .psi import PsiTriggers
from .reattach import Reattacher
from .scan import Scanner, memory_mount
from .startup import DEFAULT_METRICS_ADDR, enter_host_cgroup_namespace, listen_http, listen_unix, raise_fd_limit
from .wakes import WakeFeed

log = logging.getLogger("rtml_ebpf.agent")

TICK_INTERVAL = 0.5  # periodic work: unlimited cgroups looked at again, leases expired (scan.py)
UPKEEP_INTERVAL = 0.25  # no memcg events: re-read the files of cgroups with clients
LIMIT_CHECK_INTERVAL = 1.0  # memcg events: limits written while a cgroup is idle
SAMPLE_INTERVAL = 0.5  # usage readings for the growth rate in /metrics
READY_INTERVAL = 0.5  # programs, beat and socket looked at for /readyz

INOTIFY = "inotify"  # the selector key of the scanner's fd
OOM = "oom"  # the selector key of the OOM event ring
WAKE = "wake"  # the selector key of the enforcers' wake ring (wakes.py)


@dataclass
class AgentConfig:
    socket_path: str = protocol.DEFAULT_SOCKET
    capacity: int = 4096
    globs: tuple[str, ...] = ()
    pin_dir: str | None = None
    hooks: tuple[str, ...] | None = None
    socket_mode: int = 0o666
    metrics_addr: str | None = DEFAULT_METRICS_ADDR  # host:port of /metrics; None: off
    metrics_token_file: str | None = None  # a bearer token scrapers must send (else: root on loopback only)


class Agent:
    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.stopping = False
        self._next_tick = self._next_upkeep = 0.0
        self.selector = selectors.DefaultSelector()
        self._inotify_fd: int | None = None
        raise_fd_limit()
        enter_host_cgroup_namespace()
        self.scanner = Scanner(memory_mount(), config.globs)
        self.node: NodePrograms = load_node(config.capacity, config.hooks, config.pin_dir)
        oom: OomFeed | None = None
        try:
            self.slots = Slots(self.node.loaded, config.capacity)
            self.leases = Leases(self.slots, self.node, self.scanner)
            if self.node.adopted:
                self.leases.adopt(config.pin_dir)
            self._apply_scan()
            self.oom = oom = OomFeed(self.node)
            self.listener = listen_unix(config.socket_path, config.socket_mode)
        except BaseException:
            if oom is not None:
                oom.close()
            self.node.close()
            self.scanner.close()
            raise
        self.selector.register(self.listener, selectors.EVENT_READ, None)
        ring_fd = self.oom.fileno()
        if ring_fd is not None:
            self.selector.register(ring_fd, selectors.EVENT_READ, OOM)
        self.psi = PsiTriggers(self.slots, self.node)  # read every step: see psi.py for why not in the selector
        self.wakes = WakeFeed(self.node, self.slots)
        wake_fd = self.wakes.fileno()
        if wake_fd is not None:
            self.selector.register(wake_fd, selectors.EVENT_READ, WAKE)
        self.conns = Connections(self.selector, self.listener, self._handle, self._release)
        self.handlers = Handlers(self.leases, self.oom, self.node, self.conns.send, self.wakes)
        self.metrics = NodeMetrics()
        self._next_sample = self._next_ready = 0.0
        # read now, not at the first sample: the HTTP thread may render this first view before
        # the loop's first step has sampled (a scrape right after start saw no program series)
        self._run_stats: dict[str, tuple[int, int]] = self.node.run_stats()
        self.view = self._view()
        self.health = _health.Health()
        self.ready_check = _health.ReadyCheck(self.node.beat_fd, config.socket_path)
        self.reattacher = Reattacher(self.node)
        self._stall = os.environ.get(_health.STALL_ENV) or None  # TEST ONLY, see health.stall_for_tests
        self.notifier = Notifier()
        self.http: HttpServer | None = None
        if config.metrics_addr:
            self.http = listen_http(config.metrics_addr, config.metrics_token_file, self.health,
                                    lambda: self.metrics.render(self.view))
        ids = ",".join(f"{k}={v}" for k, v in self.node.loaded.prog_ids.items())
        log.info("rtml-ebpf agent: %s programs (%s%s), %d cgroups watched, capacity %d, serving %s",
                 "adopted pinned" if self.node.adopted else "loaded", ", ".join(self.node.hooks),
                 f"; program ids: {ids}" if ids else "", len(self.slots.by_cgid), config.capacity, config.socket_path)

    def _handle(self, fd: int, conn: Conn, message: dict[str, Any]) -> None:
        self.handlers.handle(fd, conn, message)

    def _release(self, fd: int, conn: Conn) -> None:
        """A connection closed: its leases, and its wake level."""
        self.wakes.release(fd)
        self.leases.release(fd, conn)

    # -- the loop -----------------------------------------------------------------------------
    def serve_forever(self) -> None:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        if self.http is not None:
            self.http.start()
        self.notifier.send("READY=1")
        while not self.stopping:
            try:
                self.step(0.1)
            except Exception:  # noqa: BLE001 - periodic work that failed once is retried, not fatal
                log.exception("rtml-ebpf agent: loop step failed; serving on")
                time.sleep(0.1)
        self.notifier.send("STOPPING=1")

    def _on_signal(self, signum: int, frame: object) -> None:
        log.info("rtml-ebpf agent: %s, stopping", signal.Signals(signum).name)
        self.stopping = True

    def step(self, timeout: float) -> None:
        if self._stall is not None:
            _health.stall_for_tests(self._stall)
        for key, _ in self.selector.select(timeout):
            if key.data is None:
                self.conns.accept()
            elif key.data == OOM:
                self.oom.read_ring(self.conns)
            elif key.data == WAKE:
                self.wakes.read_ring(self.conns)
            elif key.data == INOTIFY:
                self.scanner.on_events()
                self._apply_scan()
            else:
                self.conns.readable(key.data)
        now = time.monotonic()
        self.health.loop_alive(now)
        self.notifier.watchdog(now)
        if now >= self._next_ready:
            self._next_ready = now + READY_INTERVAL
            self.health.publish(self.ready_check.problems(self.node.loaded.prog_ids))
            self.reattacher.look(self.ready_check.detached, now)
        self.conns.expire(now)
        if now >= self._next_tick:
            self._next_tick = now + TICK_INTERVAL
            self.scanner.tick()
            self._apply_scan()
            self.leases.expire_orphans(now)
            self.psi.sync(self.slots.by_cgid)
        self.psi.read(now)
        self.psi.expire(now)
        self.oom.count(now, ((cgid, st.cgroup) for cgid, st in list(self.slots.by_cgid.items())), self.conns)
        if now >= self._next_sample:
            self._next_sample = now + SAMPLE_INTERVAL
            self._run_stats = self.node.run_stats()
            self.view = self._view()
            self.metrics.sample(self.view)
        if now >= self._next_upkeep:
            self._next_upkeep = now + (LIMIT_CHECK_INTERVAL if self.node.memcg_events else UPKEEP_INTERVAL)
            self.leases.upkeep()
        warm = self.leases.page_to_warm()
        if warm is not None and not self.selector.select(0):  # one page, and only while nothing waits
            self.node.page_fd(warm)
        self.view = self._view()

    def _view(self) -> AgentView:
        """The narrow snapshot the HTTP thread renders /metrics from (replaced, never edited)."""
        source = self.oom.source
        return AgentView(self.slots, tuple(self.slots.by_cgid.items()), self.config.capacity, self.node.hooks,
                         self.node.adopted, len(self.conns), self.handlers.served, self.conns.errors, source,
                         self.oom.events[source], self.oom.lost, self.oom.dropped, self._run_stats)

    # -- cgroups ------------------------------------------------------------------------------
    def _apply_scan(self) -> None:
        self.leases.apply_scan()
        self._follow_inotify()

    def _follow_inotify(self) -> None:
        """The scanner's inotify fd in the selector (it may fall back to walking, see scan.py)."""
        fd = self.scanner.fd
        if fd == self._inotify_fd:
            return
        if self._inotify_fd is not None:
            try:
                self.selector.unregister(self._inotify_fd)
            except (KeyError, ValueError):
                pass
        if fd is not None:
            self.selector.register(fd, selectors.EVENT_READ, INOTIFY)
        self._inotify_fd = fd

    # -- teardown -------------------------------------------------------------------------------
    def close(self, *, unpin: bool = False) -> None:
        if self.http is not None:
            self.http.stop()  # first: it reads the slots
        self.conns.close_all()
        self.selector.close()
        self.listener.close()
        self.ready_check.close()
        self.notifier.close()
        try:
            if stat.S_ISSOCK(os.lstat(self.config.socket_path).st_mode):
                os.unlink(self.config.socket_path)
        except OSError:
            pass
        self.psi.close()
        self.slots.release_views()
        self.oom.close()
        self.wakes.close()
        self.scanner.close()
        self.node.close(unpin=unpin)
        log.info("rtml-ebpf agent: stopped (%s)", "programs unloaded" if unpin or not self.config.pin_dir
                 else f"programs stay pinned under {self.config.pin_dir}")
