"""The node agent: watches the node's memory cgroups with one loaded object and serves each
client its own cgroup's page over a Unix socket.

One selector loop: accepting, answering and the periodic work (scan, upkeep, lease grace)
interleave, so nothing here locks. A connection is a lease: the rules a client asked for live
while its connection is open (plus a grace after an agent restart, so the clients of the
previous agent can take theirs back). Nothing on the loop waits on a client: Unix-socket
requests are whole SEQPACKET messages read non-blocking, and HTTP (/metrics and the health
probes) has a thread of its own (httpd.py) that reads only what the loop publishes.

Every byte a client sends is hostile: a request that trips anything unexpected fails that
connection alone (logged), never the agent.
"""

from __future__ import annotations

import array
import collections
import ctypes
import json
import logging
import os
import resource
import selectors
import signal
import socket
import stat
import time
from dataclasses import dataclass, field
from typing import Any

from .. import _cgroup
from .. import oom as _oom
from .._rules import Rule
from ..ebpf import abi
from ..ebpf.ring import OomRing
from ..ebpf.slots import Slots, SlotState, decode_rule, encode_rule
from ..errors import CapacityError, CgroupNotFound, ConfigError, RtmlError
from . import health as _health
from . import metrics_access, protocol
from . import peer as _peer
from .conns import MAX_CONNECTIONS, Conn, ConnLimits, RuleKey
from .httpd import HttpServer
from .metrics import AgentView, NodeMetrics
from .notify import Notifier
from .programs import NodePrograms, load_node
from .reattach import DETACHED_GRACE, reattach
from .scan import Scanner, memory_mount

log = logging.getLogger("rtml_ebpf.agent")

TICK_INTERVAL = 0.5  # periodic work: unlimited cgroups looked at again, leases expired (scan.py)
UPKEEP_INTERVAL = 0.25  # no memcg events: re-read the files of cgroups with clients
LIMIT_CHECK_INTERVAL = 1.0  # memcg events: limits written while a cgroup is idle
REQUEST_TIMEOUT = 1.0  # a connection must ask within this
MAX_REQUESTS_PER_SECOND = 20  # per connection, after its watch
LINGER = 5.0  # a rule whose last client left stays this long (a client back soon finds it as it was)
ADOPT_GRACE = 30.0  # rules adopted from pins wait this long for their clients to come back

INOTIFY = "inotify"  # the selector key of the scanner's fd
OOM = "oom"  # the selector key of the OOM event ring
DEFAULT_METRICS_ADDR = "127.0.0.1:9909"
SAMPLE_INTERVAL = 0.5  # usage readings for the growth rate in /metrics
READY_INTERVAL = 0.5  # programs, beat and socket looked at for /readyz
LOGGED_FAILURES = 20  # unexpected request failures logged with their traceback; then counted only


@dataclass
class Held:
    """One rule of one cgroup and the connections holding it."""

    index: int
    leases: set[int] = field(default_factory=set)
    orphan_until: float = 0.0  # no lease (adopted, or its last client left): kept until then


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


def enter_host_cgroup_namespace() -> bool:
    """In a pod (its own cgroup namespace) with the host's pids, see cgroup paths as the host
    does: /proc/<pid>/cgroup of other pods' processes is then resolvable. True if it moved."""
    try:
        if os.stat("/proc/self/ns/cgroup").st_ino == os.stat("/proc/1/ns/cgroup").st_ino:
            return False
        fd = os.open("/proc/1/ns/cgroup", os.O_RDONLY)
    except OSError:
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.setns(fd, 0x02000000) != 0:  # CLONE_NEWCGROUP
            log.warning("rtml-ebpf agent: cannot enter the host cgroup namespace: %s",
                        os.strerror(ctypes.get_errno()))
            return False
    finally:
        os.close(fd)
    log.info("rtml-ebpf agent: entered the host cgroup namespace (pid 1's)")
    return True


def raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, MAX_CONNECTIONS * 2 + 1024) if hard != resource.RLIM_INFINITY else MAX_CONNECTIONS * 2 + 1024
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


class Agent:
    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.stopping = False
        self.conns: dict[int, Conn] = {}  # fd -> connection
        self.limits = ConnLimits()
        self.failures = 0  # requests that tripped something unexpected (logged, the connection failed)
        self.held: dict[int, dict[RuleKey, Held]] = {}  # cgroup id -> its rules
        self.refused: set[int] = set()  # cgroups logged as not watchable (capacity, nesting)
        self.served = 0
        self.errors = 0
        self._next_tick = self._next_upkeep = 0.0
        self.selector = selectors.DefaultSelector()
        self._inotify_fd: int | None = None
        raise_fd_limit()
        enter_host_cgroup_namespace()
        self.scanner = Scanner(memory_mount(), config.globs)
        self.node: NodePrograms = load_node(config.capacity, config.hooks, config.pin_dir)
        self.oom_ring: OomRing | None = None
        self.oom_counted: _oom.CountedOoms | None = None
        self.oom_events: collections.Counter[str] = collections.Counter()  # by source
        self.events_dropped = 0  # records not sent to a subscriber whose socket was full
        self._next_count = 0.0
        try:
            self.slots = Slots(self.node.loaded, config.capacity)
            if self.node.adopted:
                self._adopt()
            self._apply_scan()
            if "oom_victim" in self.node.hooks:
                self.oom_ring = OomRing(self.node.loaded.fds["oom_events"])
            else:
                self.oom_counted = _oom.CountedOoms()
                log.warning("rtml-ebpf agent: %s", _oom.NO_HOOK)
            self.listener = self._listen(config.socket_path, config.socket_mode)
        except BaseException:
            if self.oom_ring is not None:
                self.oom_ring.close()
            self.node.close()
            self.scanner.close()
            raise
        self.selector.register(self.listener, selectors.EVENT_READ, None)
        if self.oom_ring is not None:
            self.selector.register(self.oom_ring.fileno(), selectors.EVENT_READ, OOM)
        self.metrics = NodeMetrics()
        self._next_sample = self._next_ready = self._detached_since = 0.0
        self._run_stats: dict[str, tuple[int, int]] = {}
        self.view = self._view()
        self.health = _health.Health()
        self.ready_check = _health.ReadyCheck(self.node.beat_fd, config.socket_path)
        self._stall = os.environ.get(_health.STALL_ENV) or None  # TEST ONLY, see health.stall_for_tests
        self.notifier = Notifier()
        self.http: HttpServer | None = None
        self.metrics_token: str | None = None
        if config.metrics_addr:
            self.http = self._listen_http(config.metrics_addr, config.metrics_token_file)
        ids = ",".join(f"{k}={v}" for k, v in self.node.loaded.prog_ids.items())
        log.info("rtml-ebpf agent: %s programs (%s%s), %d cgroups watched, capacity %d, serving %s",
                 "adopted pinned" if self.node.adopted else "loaded", ", ".join(self.node.hooks),
                 f"; program ids: {ids}" if ids else "", len(self.slots.by_cgid), config.capacity, config.socket_path)

    # -- setup ------------------------------------------------------------------------------
    def _listen(self, path: str, mode: int) -> socket.socket:
        os.makedirs(os.path.dirname(path) or ".", mode=0o755, exist_ok=True)
        if os.path.exists(path):
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            try:
                probe.settimeout(0.5)
                probe.connect(path)
                raise ConfigError(f"another rtml-ebpf agent already serves {path}; stop it first")
            except OSError:
                os.unlink(path)  # a stale socket of an agent that died
            finally:
                probe.close()
        # Bound under a temporary name and renamed into place once listening: a client never
        # finds the path before it can connect.
        staging = f"{path}.{os.getpid()}"
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            if os.path.exists(staging):
                os.unlink(staging)
            sock.bind(staging)
            os.chmod(staging, mode)
            sock.listen(512)
            sock.setblocking(False)
            os.rename(staging, path)
        except BaseException:
            sock.close()
            raise
        return sock

    def _listen_http(self, addr: str, token_file: str | None) -> HttpServer | None:
        """The HTTP listener: health probes always; /metrics with a token, or without one for
        root on loopback only. A port that cannot be bound is logged, not fatal: the verdicts
        are the agent's first job."""
        host, _, port = addr.rpartition(":")
        served = True
        if token_file is not None:
            try:
                self.metrics_token = metrics_access.read_token(token_file)
            except (OSError, ValueError) as exc:
                log.warning("rtml-ebpf agent: no metrics endpoint: cannot read the token in %s (%s)", token_file, exc)
                served = False
        elif not metrics_access.is_loopback(host):
            log.warning("rtml-ebpf agent: no metrics endpoint: %s is beyond loopback and every cgroup's figures "
                        "would be readable there; pass --metrics-token-file (a bearer token scrapers send)", addr)
            served = False
        try:
            sock = socket.create_server((host.strip("[]") or "127.0.0.1", int(port)), reuse_port=False)
        except (OSError, ValueError) as exc:
            log.warning("rtml-ebpf agent: no HTTP endpoint: cannot listen on %s (%s)", addr, exc)
            return None
        bound = sock.getsockname()
        server = HttpServer(sock, self.health, lambda: self.metrics.render(self.view), self.metrics_token, served)
        if served:
            log.info("rtml-ebpf agent: metrics at http://%s:%d/metrics (%s)", bound[0], bound[1],
                     "bearer token" if self.metrics_token else "root on loopback only")
        log.info("rtml-ebpf agent: health probes at http://%s:%d/healthz and /readyz", bound[0], bound[1])
        return server

    def _adopt(self) -> None:
        """A previous agent's pinned state: keep every watched cgroup that still exists, its
        rules held for ADOPT_GRACE so that its clients (reconnecting) find the same indices."""
        found = self.slots.adopt({cgid: self.scanner.cgroup_at(d) for cgid, d in self.scanner.present.items()})
        until = time.monotonic() + ADOPT_GRACE
        for cgid, rules in found.items():
            self.held[cgid] = {(r.kind, r.metric, r.trip, r.clear): Held(i, orphan_until=until)
                               for i, r in rules.items()}
            state = self.slots.by_cgid[cgid]
            for i, r in rules.items():
                state.rules[i] = decode_rule(r.kind, r.metric, r.trip, r.clear)
            if rules:
                self.node.page_fd(state.index, create=False)  # the page its clients still map
        log.info("rtml-ebpf agent: adopted %d watched cgroups (%d with rules) from %s", len(found),
                 sum(1 for r in found.values() if r), self.config.pin_dir)

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
                self._accept()
            elif key.data == OOM:
                self._read_ooms()
            elif key.data == INOTIFY:
                self.scanner.on_events()
                self._apply_scan()
            else:
                self._readable(key.data)
        now = time.monotonic()
        self.health.loop_alive(now)
        self.notifier.watchdog(now)
        if now >= self._next_ready:
            self._next_ready = now + READY_INTERVAL
            self._check_ready(now)
        for fd, conn in list(self.conns.items()):
            if not conn.keys and conn.events_scope is None and now > conn.deadline:
                self._fail(fd, f"no request within {REQUEST_TIMEOUT:g} s")
        if now >= self._next_tick:
            self._next_tick = now + TICK_INTERVAL
            self.scanner.tick()
            self._apply_scan()
            self._expire_orphans(now)
        if self.oom_counted is not None and now >= self._next_count:
            self._next_count = now + _oom.COUNT_INTERVAL
            self._on_ooms(self.oom_counted.read((cgid, st.cgroup) for cgid, st in list(self.slots.by_cgid.items())))
        if now >= self._next_sample:
            self._next_sample = now + SAMPLE_INTERVAL
            self._run_stats = self.node.run_stats()
            self.view = self._view()
            self.metrics.sample(self.view)
        if now >= self._next_upkeep:
            self._next_upkeep = now + (LIMIT_CHECK_INTERVAL if self.node.memcg_events else UPKEEP_INTERVAL)
            self._upkeep()
        self.view = self._view()

    def _check_ready(self, now: float) -> None:
        problems = self.ready_check.problems(self.node.loaded.prog_ids)
        self.health.publish(problems)
        gone = self.ready_check.detached
        if not gone:
            self._detached_since = 0.0
        elif not self._detached_since:
            self._detached_since = now
            log.warning("rtml-ebpf agent: programs of %s are no longer attached (pins removed?); not ready",
                        ", ".join(gone))
        elif now - self._detached_since >= DETACHED_GRACE:
            self._detached_since = 0.0
            try:
                reattach(self.node, gone)
            except RtmlError as exc:
                log.warning("rtml-ebpf agent: cannot attach %s again: %s", ", ".join(gone), exc)

    def _view(self) -> AgentView:
        """The narrow snapshot the HTTP thread renders /metrics from (replaced, never edited)."""
        source = "bpf" if self.oom_ring is not None else "memory.events"
        return AgentView(self.slots, tuple(self.slots.by_cgid.items()), self.config.capacity, self.node.hooks,
                         self.node.adopted, len(self.conns), self.served, self.errors, source,
                         self.oom_events[source], self.oom_lost, self.events_dropped, self._run_stats)

    # -- OOM kills ---------------------------------------------------------------------------
    def _read_ooms(self) -> None:
        assert self.oom_ring is not None
        try:
            raw = self.oom_ring.drain()
        except RtmlError as exc:
            log.warning("rtml-ebpf agent: %s", exc)
            return
        self._on_ooms([_oom.from_event(e) for e in raw])

    def _on_ooms(self, kills: list[_oom.OomKill]) -> None:
        """Each kill: one JSON line in the log, counted, and sent to the events subscribers
        that may see its cgroup."""
        for kill in kills:
            self.oom_events[kill.source] += kill.count
            record = kill.as_dict()
            log.warning("rtml-ebpf agent: OOM kill %s", json.dumps(record, separators=(",", ":")))
            try:
                data = protocol.encode(record)
            except ConfigError:
                continue  # over the message size (a path of 10 levels of 128 bytes): in the log only
            for conn in list(self.conns.values()):
                scope = conn.events_scope
                if scope is None or (scope and not _oom.within(kill.cgroup, scope)):
                    continue
                try:
                    conn.sock.send(data)
                except (BlockingIOError, InterruptedError):
                    self.events_dropped += 1  # a subscriber that does not read loses events, not us
                except OSError:
                    pass  # gone: the loop closes it

    @property
    def oom_lost(self) -> int:
        """Victims the ring had no room for (the programs count them in ctl)."""
        ctl = self.node.loaded.maps.get("ctl")
        return int(abi.Ctl.from_buffer_copy(ctl[: ctypes.sizeof(abi.Ctl)]).events_lost) if ctl is not None else 0

    def _serve_events(self, fd: int, conn: Conn, message: dict[str, Any]) -> None:
        """Subscribe this connection to OOM kills: root sees the node, anyone else the cgroup it
        runs in (or its pod, with scope "pod"), decided from its credentials."""
        extra = set(message) - {"v", "op", "scope"}
        if extra:
            raise ConfigError(f"unknown request fields {sorted(extra)}; the agent decides what you may see "
                              "from your connection's credentials")
        scope = message.get("scope", "self")
        if scope not in protocol.SCOPES:
            raise ConfigError(f"scope={scope!r}: one of {', '.join(protocol.SCOPES)}")
        if conn.peer.uid == 0:
            seen = ""
        else:
            cg = _peer.cgroup_of(conn.peer)
            seen = (_peer.pod_ancestor(cg) if scope == "pod" else cg).path
            if seen.strip("/") == "":
                raise ConfigError("your cgroup is the root cgroup, whose subtree is the whole node: only root sees "
                                  "every cgroup's OOM kills; run in a cgroup of your own")
        conn.events_scope = seen
        source = "bpf" if self.oom_ring is not None else "memory.events"
        note = "" if self.oom_ring is not None else _oom.NO_HOOK
        self._send(fd, {"ok": True, "source": source, "scope": seen or "/", "note": note})

    # -- cgroups ------------------------------------------------------------------------------
    def _apply_scan(self) -> None:
        added, removed = self.scanner.changes()
        for f in added:
            if f.cgroup_id not in self.slots.by_cgid:
                self._watch(f.cgroup, f.cgroup_id)
        for cgid in removed:
            self.refused.discard(cgid)
            if cgid in self.slots.by_cgid:
                self._unwatch(cgid, "removed")
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

    def _watch(self, cg: _cgroup.MemoryCgroup, cgid: int) -> SlotState | None:
        try:
            state = self.slots.watch(cg)
        except CapacityError as exc:
            if cgid not in self.refused:
                self.refused.add(cgid)
                log.warning("rtml-ebpf agent: not watching %s: %s", cg.directory, exc)
            return None
        except (OSError, RtmlError) as exc:
            log.info("rtml-ebpf agent: cannot watch %s: %s", cg.directory, exc)
            return None
        self.refused.discard(cgid)
        log.info("rtml-ebpf agent: watching %s (id %d, slot %d)", cg.directory, cgid, state.index)
        return state

    def _unwatch(self, cgid: int, why: str) -> None:
        state = self.slots.unwatch_cgroup(cgid)
        if state is None:
            return
        self.node.drop_page(state.index)
        self.held.pop(cgid, None)
        log.info("rtml-ebpf agent: unwatched %s (%s)", state.cgroup.directory, why)

    def _expire_orphans(self, now: float) -> None:
        for cgid, rules in list(self.held.items()):
            for key, h in list(rules.items()):
                if h.orphan_until and now > h.orphan_until and not h.leases:
                    self._drop_rule(cgid, key)

    def _upkeep(self) -> None:
        for cgid, rules in self.held.items():
            state = self.slots.by_cgid.get(cgid)
            if state is None or not rules:
                continue
            try:
                if self.node.memcg_events:
                    if self.slots.check_limit(state.index, cgid):
                        self.node.publish(state.index)
                else:
                    self.slots.upkeep(state.index, cgid)
                    self.node.publish(state.index)
            except (OSError, RtmlError):
                pass  # removed meanwhile: the next scan unwatches it

    # -- rules and leases -----------------------------------------------------------------------
    def _hold(self, state: SlotState, rule: Rule, conn_id: int) -> int:
        key: RuleKey = encode_rule(rule)
        rules = self.held.setdefault(state.cgroup_id, {})
        h = rules.get(key)
        if h is None:
            taken = {x.index for x in rules.values()}
            index = next((i for i in range(abi.MAX_RULES) if i not in taken), None)
            if index is None:
                raise CapacityError(
                    f"cgroup {state.cgroup.directory} already has {abi.MAX_RULES} distinct thresholds held by "
                    "clients; use one of theirs (the same threshold and hysteresis share one)")
            self.slots.set_rule(state, index, rule)
            h = rules[key] = Held(index)
            self.node.publish(state.index)
        h.leases.add(conn_id)
        h.orphan_until = 0.0
        return h.index

    def _drop_rule(self, cgid: int, key: RuleKey) -> None:
        rules = self.held.get(cgid, {})
        h = rules.pop(key, None)
        state = self.slots.by_cgid.get(cgid)
        if h is None or state is None:
            return
        self.slots.set_rule(state, h.index, None)
        self.node.publish(state.index)
        if not rules and cgid not in self.scanner.wanted:
            self._unwatch(cgid, "its last client left")

    def _release(self, conn_id: int, conn: Conn) -> None:
        rules = self.held.get(conn.cgid, {})
        for key in conn.keys:
            h = rules.get(key)
            if h is not None:
                h.leases.discard(conn_id)
                if not h.leases:
                    # Not dropped at once: its index is not lent to another rule while a client
                    # that lost its connection may still read it, and a client back soon finds it.
                    h.orphan_until = time.monotonic() + LINGER
        conn.keys = []

    # -- connections ----------------------------------------------------------------------------
    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE and friends: shed, keep serving
                log.warning("rtml-ebpf agent: accept failed: %s", exc)
                return
            sock.setblocking(False)
            try:
                peer = _peer.peer_of(sock)
            except OSError as exc:
                # Not "no pidfd here": the peer is gone (its pid may be reused) or unknowable.
                self.errors += 1
                _refuse(sock, f"the agent cannot identify this connection's process ({exc.strerror or exc}); "
                              "connect again from a live process")
                continue
            conn = Conn(sock, peer, time.monotonic() + REQUEST_TIMEOUT, _peer.cgroup_key(peer))
            why = self.limits.admit(conn)
            if why is not None:
                self.errors += 1
                _refuse(sock, why)
                peer.close()
                continue
            fd = sock.fileno()
            self.conns[fd] = conn
            self.selector.register(sock, selectors.EVENT_READ, fd)

    def _readable(self, fd: int) -> None:
        conn = self.conns.get(fd)
        if conn is None:
            return
        try:
            data, _, flags, _ = conn.sock.recvmsg(protocol.MAX_MESSAGE + 1)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close(fd)
            return
        if not data:
            self._close(fd)  # the client went: its lease ends
            return
        if flags & socket.MSG_TRUNC or len(data) > protocol.MAX_MESSAGE:
            self._fail(fd, f"message over {protocol.MAX_MESSAGE} bytes")
            return
        now = time.monotonic()
        if now - conn.window_start >= 1.0:
            conn.window_start, conn.window_count = now, 0
        conn.window_count += 1
        if conn.window_count > MAX_REQUESTS_PER_SECOND:
            self._fail(fd, f"over {MAX_REQUESTS_PER_SECOND} requests per second")
            return
        try:
            message = protocol.decode(data)
            if message.get("v") != protocol.VERSION:
                raise ConfigError(f"protocol version {message.get('v')!r}; this agent speaks {protocol.VERSION}")
            op = message.get("op")
            if conn.events_scope is not None:
                raise ConfigError("an events connection only listens; open another to ask anything else")
            if op == "watch" and not conn.keys:
                self._serve_watch(fd, conn, message)
            elif op == "events" and not conn.keys:
                self._serve_events(fd, conn, message)
            elif op == "stats" and conn.keys:
                self._send(fd, self._stats(conn))
            else:
                raise ConfigError(f"op={op!r}: a new connection asks \"watch\" or \"events\" once; then a "
                                  "watching one only \"stats\"")
        except (ConfigError, CgroupNotFound, CapacityError) as exc:
            self._fail(fd, str(exc))
        except (OSError, RtmlError) as exc:
            log.warning("rtml-ebpf agent: request of pid %d failed: %s", conn.peer.pid, exc)
            self._fail(fd, f"the agent failed to serve the request: {exc}")
        except Exception as exc:  # noqa: BLE001 - whatever a client triggers fails its connection alone
            self.failures += 1
            if self.failures <= LOGGED_FAILURES:
                log.exception("rtml-ebpf agent: request of pid %d (uid %d) failed unexpectedly; connection "
                              "closed, serving on", conn.peer.pid, conn.peer.uid)
            elif self.failures % 1000 == 0:
                log.warning("rtml-ebpf agent: %d requests failed unexpectedly so far (%r)", self.failures, exc)
            self._fail(fd, f"the agent could not serve this request ({type(exc).__name__}); it was logged")

    def _serve_watch(self, fd: int, conn: Conn, message: dict[str, Any]) -> None:
        extra = set(message) - {"v", "op", "scope", "rules"}
        if extra & {"cgroup", "pid", "cgroup_id", "path"}:
            raise ConfigError("the agent decides your cgroup from your connection's credentials; "
                              "send no cgroup, path or pid")
        if extra:
            raise ConfigError(f"unknown request fields {sorted(extra)}")
        scope = message.get("scope", "self")
        if scope not in protocol.SCOPES:
            raise ConfigError(f"scope={scope!r}: one of {', '.join(protocol.SCOPES)}")
        raw_rules = message.get("rules")
        if not isinstance(raw_rules, list) or not 1 <= len(raw_rules) <= protocol.MAX_RULES_PER_REQUEST:
            raise ConfigError(f"rules: a list of 1 to {protocol.MAX_RULES_PER_REQUEST} rules")
        rules = [protocol.rule_from_wire(r) for r in raw_rules]
        cg = _peer.cgroup_of(conn.peer)
        if scope == "pod":
            cg = _peer.pod_ancestor(cg)
        cgid = cg.cgroup_id
        state = self.slots.by_cgid.get(cgid)
        if state is None or not state.watched:
            state = self.slots.watch(cg)  # CapacityError says why
            log.info("rtml-ebpf agent: watching %s (id %d, slot %d) for pid %d", cg.directory, cgid, state.index,
                     conn.peer.pid)
        conn.cgid = cgid
        indices = []
        try:
            for rule in rules:
                indices.append(self._hold(state, rule, fd))
                conn.keys.append(encode_rule(rule))
        except BaseException:
            self._release(fd, conn)
            raise
        page_fd = self.node.client_page(state.index)
        reply = {"ok": True, "cgroup": cg.directory, "cgroup_path": cg.path, "cgroup_id": cgid, "rules": indices,
                 "hooks": list(self.node.hooks), "page_map_id": self.node.page_map_id(state.index),
                 "abi": abi.ABI_VERSION, "upkeep": not self.node.memcg_events}
        self._send(fd, reply, [page_fd, self.node.beat_fd])
        self.served += 1

    def _stats(self, conn: Conn) -> dict[str, Any]:
        state = self.slots.by_cgid.get(conn.cgid)
        if state is None:
            raise CgroupNotFound("the cgroup is no longer watched (removed)")
        c = self.slots.read_counters(state.index)
        return {"ok": True, "faults": int(c.faults), "events": int(c.events),
                "growth": {k: [int(getattr(c, f"{k}_charged")), int(getattr(c, f"{k}_uncharged"))]
                           for k in abi.GROWTH_KINDS}}

    def _send(self, fd: int, message: dict[str, Any], fds: list[int] | None = None) -> None:
        conn = self.conns[fd]
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
        conn.sock.sendmsg([protocol.encode(message)], anc)

    def _fail(self, fd: int, why: str) -> None:
        """An error reply, then the connection closes; the agent keeps serving."""
        self.errors += 1
        conn = self.conns.get(fd)
        if conn is not None:
            try:
                conn.sock.sendmsg([protocol.encode({"ok": False, "error": why})])
            except OSError:
                pass
        self._close(fd)

    def _close(self, fd: int) -> None:
        conn = self.conns.pop(fd, None)
        if conn is None:
            return
        self._release(fd, conn)
        self.limits.release(conn)
        try:
            self.selector.unregister(conn.sock)
        except (KeyError, ValueError):
            pass
        conn.sock.close()
        conn.peer.close()

    # -- teardown -------------------------------------------------------------------------------
    def close(self, *, unpin: bool = False) -> None:
        if self.http is not None:
            self.http.stop()  # first: it reads the slots
        for fd in list(self.conns):
            self._close(fd)
        self.selector.close()
        self.listener.close()
        self.ready_check.close()
        self.notifier.close()
        try:
            if stat.S_ISSOCK(os.lstat(self.config.socket_path).st_mode):
                os.unlink(self.config.socket_path)
        except OSError:
            pass
        self.slots.release_views()
        if self.oom_ring is not None:
            self.oom_ring.close()
        self.scanner.close()
        self.node.close(unpin=unpin)
        log.info("rtml-ebpf agent: stopped (%s)", "programs unloaded" if unpin or not self.config.pin_dir
                 else f"programs stay pinned under {self.config.pin_dir}")



def _refuse(sock: socket.socket, why: str) -> None:
    """An error reply on a connection that was never admitted, then close it."""
    try:
        sock.sendmsg([protocol.encode({"ok": False, "error": why})])
    except OSError:
        pass
    sock.close()
