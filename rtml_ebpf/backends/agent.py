"""``Limiter(backend="agent")``: the verdicts of this process's cgroup from the node agent.

The agent passes the cgroup's frozen page; it is mapped read-only here, and the hot path reads
one byte of it, exactly as the root path reads its own map: no syscall, no bpf(). The beat
page tells whether the programs still run. When they stop (agent gone and its programs
unloaded) or the page is retired, the backend is *lost*: every mapping is replaced in place by
a private page holding the fail answer, so a kept check can never serve a frozen verdict, and
the Limiter moves to polling (see Limiter._observe).
"""

from __future__ import annotations

import array
import logging
import mmap
import os
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

from .._cgroup import MemoryCgroup, find_process_cgroup
from .._rules import Rule
from ..agent import protocol
from ..config import PAGE_SIZE
from ..ebpf import abi
from ..ebpf.words import read_consistent, room_from_pages, slot_readings
from ..errors import AgentUnavailable
from ..snapshot import Snapshot
from .agent_maps import (  # noqa: F401 - _address: tests/support maps pages with it
    _address,
    _map_id,
    _map_readonly,
    _retire_mapping,
    ask_stats,
    byte_writer,
    thread_meter_from_pins,
)
from .agent_meter import shared_meter
from .agent_own import BACKENDS, WAKERS, own_connection
from .agent_wake import waker_of
from .base import Flag

log = logging.getLogger("rtml_ebpf")
DEFAULT_PIN_DIR = "/sys/fs/bpf/rtml-ebpf"  # the node agent's (agent/programs.py)

CONNECT_TIMEOUT = 1.0
# A watch's reply, once the agent accepted the connection: it is alive, and may be busy (its
# start-up, a burst of clients such as `uvicorn --workers 32` starting at once, a loaded node).
# Waiting longer than CONNECT_TIMEOUT here keeps a root process from loading programs of its own
# beside the agent's (issue 20); an agent that is stopped costs a start-up this long, then auto
# moves on.
REPLY_TIMEOUT = 5.0
BEAT_STALE_NS = 600_000_000  # six missed beats: the programs are gone
CHECK_INTERVAL = 0.2  # seconds between looks at the beat, the page and the connection
_U64 = struct.Struct("=Q")
W_INACTIVE_BASE = abi.Slot.inactive_file_base.offset // 8  # a page-only word (the config's copy)

def socket_path() -> str:
    return os.environ.get("RTML_AGENT_SOCKET") or protocol.DEFAULT_SOCKET


@dataclass
class Lease:
    """One rule held by the agent for this process: the connection, and the mapped page."""

    sock: socket.socket | None
    addr: int
    page: mmap.mmap
    view: memoryview
    rule: Rule
    index: int
    page_map_id: int
    hot: Any
    words: Any  # the page as int64 words, for room()
    retired: bool = False
    writable: bool = False  # retired into a private page of ours: its verdict byte may be written


def _queued_refusal(sock: socket.socket) -> str | None:
    """The agent's error reply still queued on a connection it closed, if any."""
    try:
        data = sock.recv(protocol.MAX_MESSAGE, socket.MSG_DONTWAIT)
        reply = protocol.decode(data) if data else None
    except Exception:  # noqa: BLE001 - nothing readable: the caller says what it saw
        return None
    return str(reply.get("error")) if isinstance(reply, dict) and reply.get("error") else None


def _scope_for(cgroup: MemoryCgroup, own_cgroup_id: int | None) -> tuple[str, str | None]:
    """What a watch asks for: ("self", None) for our own cgroup; another one by its directory
    when we are root (root may watch any cgroup, as its files allow); else ("pod", None): the
    agent serves our own cgroup or our pod's, nothing else. The agent decides; a wrong guess is
    refused with its reason."""
    try:
        if own_cgroup_id is None:  # (the caller may know it: one reading of /proc less at start)
            own_cgroup_id = find_process_cgroup().cgroup_id
        if own_cgroup_id != cgroup.cgroup_id:
            return ("self", cgroup.directory) if os.geteuid() == 0 else ("pod", None)
    except Exception:  # noqa: BLE001
        pass
    return "self", None


def _request(rule: Rule, scope: str, path: str, cgroup: str | None = None
             ) -> tuple[socket.socket, dict[str, Any], list[int]]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    try:
        sock.settimeout(CONNECT_TIMEOUT)
        try:
            sock.connect(path)
        except FileNotFoundError:
            raise AgentUnavailable(f"no agent socket at {path} (start `rtml-ebpf agent`, or mount its "
                                   "directory into the pod; RTML_AGENT_SOCKET names another path)") from None
        except OSError as exc:
            raise AgentUnavailable(f"cannot connect to {path}: {exc.strerror or exc}") from None
        sock.settimeout(REPLY_TIMEOUT)
        try:
            # The agent may close an accepted connection at once (full, or its caps per uid):
            # the send then fails with EPIPE or ECONNRESET, which is "unavailable", not a crash.
            request: dict[str, Any] = {"v": protocol.VERSION, "op": "watch", "scope": scope,
                                       "rules": [protocol.rule_to_wire(rule)]}
            if cgroup is not None:
                request["cgroup"] = cgroup  # root only: the agent checks our uid from the kernel
            sock.sendall(protocol.encode(request))
        except OSError as exc:
            raise AgentUnavailable(f"the agent at {path} refused the request: "
                                   f"{_queued_refusal(sock) or exc.strerror or exc}") from None
        try:
            data, anc, _, _ = sock.recvmsg(protocol.MAX_MESSAGE, socket.CMSG_SPACE(2 * 4))
        except ConnectionResetError as exc:
            # A reset is reported before a reply queued ahead of it: read that, it says why.
            raise AgentUnavailable(f"the agent at {path} refused: "
                                   f"{_queued_refusal(sock) or exc.strerror or exc}") from None
        except TimeoutError:
            raise AgentUnavailable(f"the agent at {path} accepted but did not answer within {REPLY_TIMEOUT:g} s "
                                   "(stopped or overloaded?)") from None
        except OSError as exc:
            raise AgentUnavailable(f"the agent at {path} did not answer: {exc.strerror or exc}") from None
        fds: list[int] = []
        for level, kind, payload in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.extend(array.array("i", payload[: len(payload) - len(payload) % 4]))
        try:
            reply = protocol.decode(data) if data else {"ok": False, "error": "the agent closed the connection"}
        except Exception as exc:  # noqa: BLE001
            reply = {"ok": False, "error": f"unreadable reply: {exc}"}
        if not isinstance(reply, dict):
            reply = {"ok": False, "error": "unreadable reply: not an object"}
        if not reply.get("ok") or len(fds) != 2:
            for fd in fds:
                os.close(fd)
            raise AgentUnavailable(f"the agent at {path} refused: {reply.get('error', 'no pages passed')}")
        sock.setblocking(False)
        return sock, reply, fds
    except BaseException:
        sock.close()
        raise


class AgentBackend:
    name = "agent"
    hot_never_raises = True  # a one-byte view of a page that stays mapped for the life of the process
    needs_upkeep = True  # the monitor looks at the beat, the page and the connection

    def __init__(self, cgroup: MemoryCgroup, why: str, path: str | None = None, *, pin_dir: str | None = None,
                 respawn: Callable[[], None] | None = None, own_cgroup_id: int | None = None) -> None:
        self.cgroup = cgroup
        # Where the agent pins its maps (root clients open the threads array there), and how to
        # start the agent again when it is gone (the node's shared load, backends/shared.py).
        self._pin_dir = pin_dir or os.environ.get("RTML_AGENT_PIN_DIR") or DEFAULT_PIN_DIR
        self._respawn = respawn
        self._meter: Any = None
        # root only: a duplicate of the beat map's fd, to name (by its id) the agent whose pins
        # we may open for the thread meter; asked at the first thread_meter(), not at start
        self._beat_fd = -1
        self._ancestors = cgroup.ancestors()  # to name the limit's source in readings
        self._sock_lock = threading.Lock()  # a lease socket: one user at a time (stats, liveness)
        self.pid = os.getpid()  # whose connections these are: a forked child's meter opens its own
        self.path = path or socket_path()
        self.hooks: tuple[str, ...] = ()
        self.reason = why
        self.lost: str | None = None
        self._leases: list[Lease] = []
        self._beat: mmap.mmap | None = None
        self._beat_mv: memoryview | None = None
        self._cgid = cgroup.cgroup_id
        self._upkeep_by_agent = False
        self._next_check = 0.0
        self._fail_answer = False
        self._scope, self._other = _scope_for(cgroup, own_cgroup_id)
        BACKENDS.add(self)  # (their lease locks start free in a forked child: agent_own.py)

    # -- rules --------------------------------------------------------------------------------
    def add_rule(self, rule: Rule) -> Lease:
        sock, reply, fds = _request(rule, self._scope, self.path, self._other)
        page_fd, beat_fd = fds
        try:
            if reply.get("abi") != abi.ABI_VERSION:
                raise AgentUnavailable(f"the agent speaks page ABI {reply.get('abi')}, this library "
                                       f"{abi.ABI_VERSION}: upgrade one of them")
            if reply.get("cgroup_id") != self._cgid:
                raise AgentUnavailable(
                    f"the agent serves this process's cgroup ({reply.get('cgroup')}), not {self.cgroup.directory}; "
                    "build the Limiter for this process's own cgroup (or its pod; root may name any)")
            if self._beat is None:
                try:
                    self._beat = mmap.mmap(beat_fd, PAGE_SIZE, mmap.MAP_SHARED, mmap.PROT_READ)
                except OSError as exc:
                    raise AgentUnavailable(f"cannot map the agent's beat page: {exc.strerror or exc}") from None
                self._beat_mv = memoryview(self._beat)
                if os.geteuid() == 0:
                    self._beat_fd = os.dup(beat_fd)
            index = _rule_index(reply)
            addr, page = _map_readonly(page_fd)
        except BaseException:
            sock.close()
            raise
        finally:
            os.close(page_fd)
            os.close(beat_fd)
        view = memoryview(page)
        map_id = reply.get("page_map_id")
        lease = Lease(sock, addr, page, view, rule, index, map_id if isinstance(map_id, int) else 0,
                      view.cast("?")[abi.TRIPPED_OFFSET + index : abi.TRIPPED_OFFSET + index + 1],
                      view.cast("q"))
        self._leases.append(lease)
        hooks = reply.get("hooks")
        self.hooks = tuple(str(h) for h in hooks) if isinstance(hooks, list) else ()
        self._upkeep_by_agent = bool(reply.get("upkeep"))
        self.reason = (f"{self.reason}: verdict page from the node agent at {self.path} "
                       f"(its hooks: {', '.join(self.hooks)})")
        if not self._alive():
            self.remove_rule(lease)
            raise AgentUnavailable(f"the agent at {self.path} answered but its programs do not beat")
        return lease

    def remove_rule(self, flag: object, fail_answer: bool = False) -> None:
        if isinstance(flag, Lease) and flag in self._leases:
            self._leases.remove(flag)
            self._retire(flag, fail_answer)

    def _retire(self, lease: Lease, fail_answer: bool) -> None:
        if not lease.retired:
            lease.retired = True
            lease.writable = _retire_mapping(lease.addr, fail_answer)
        if lease.sock is not None:
            lease.sock.close()
            lease.sock = None

    def hot(self, flag: object) -> Flag:
        assert isinstance(flag, Lease)
        return cast(Flag, flag.hot)

    # -- liveness -----------------------------------------------------------------------------
    def _alive(self) -> bool:
        mv = self._beat_mv
        if mv is None:
            return False
        beat_ns: int = _U64.unpack_from(mv, abi.Beat.beat_ns.offset)[0]
        return time.monotonic_ns() - beat_ns < BEAT_STALE_NS

    def maintain(self, flag: object) -> None:
        """From the monitor: the programs still beat, each page is still this cgroup's, and each
        lease still has its connection (reconnecting after an agent restart). Otherwise the
        backend is lost: pages replaced by the fail answer, the Limiter moves to polling."""
        now = time.monotonic()
        if self.lost or now < self._next_check:
            return
        self._next_check = now + CHECK_INTERVAL
        if not self._alive():
            self._lose("the agent's programs stopped beating (agent gone and its programs unloaded)")
            return
        for lease in self._leases:
            if _U64.unpack_from(lease.view, abi.Slot.cgroup_id.offset)[0] != self._cgid:
                self._lose("the agent retired this cgroup's page")
                return
            if not self._sock_lock.acquire(timeout=2 * CONNECT_TIMEOUT):
                return  # a stats request holds the socket: look again next time
            try:
                gone = lease.sock is None or _closed(lease.sock)
                if gone and lease.sock is not None:
                    lease.sock.close()
                    lease.sock = None
            finally:
                self._sock_lock.release()
            if gone:
                self._reconnect(lease)
                if self.lost:
                    return

    def _reconnect(self, lease: Lease) -> None:
        """The agent restarted (its pinned programs kept writing our page): take the lease back.
        Another page or index means it lost its pins: then this backend is lost."""
        if lease.sock is not None:
            lease.sock.close()
            lease.sock = None
        try:
            sock, reply, fds = _request(lease.rule, self._scope, self.path, self._other)
        except AgentUnavailable:
            if self._respawn is None:
                return  # not back yet: the page still beats, keep reading it and retry
            try:
                self._respawn()  # the shared load's agent died: start another (it adopts the pins)
                sock, reply, fds = _request(lease.rule, self._scope, self.path, self._other)
            except (AgentUnavailable, OSError) as exc:
                log.debug("rtml-ebpf: the node's shared agent is not back yet: %s", exc)
                return
        for fd in fds:
            os.close(fd)
        try:
            index = _rule_index(reply)
        except AgentUnavailable:
            index = -1
        if reply.get("page_map_id") != lease.page_map_id or index != lease.index:
            sock.close()
            self._lose("the agent restarted with new programs (its pins were gone)")
            return
        lease.sock = sock

    def _lose(self, why: str) -> None:
        self.lost = why
        for lease in self._leases:
            if not lease.retired:
                lease.retired = True
                lease.writable = _retire_mapping(lease.addr, self._fail_answer)

    def kept_writer(self, flag: object) -> Callable[[bool], None] | None:
        """For a retired lease: a function writing an answer into its verdict byte, which checks
        kept from before (``check = lim.is_mem_limit_reached``) still read. The Limiter writes
        its current answer there from the monitor, so such a check follows the backend that
        took over instead of answering the fail answer for good (issue 21, item 7). The
        function holds the lease, so the page stays mapped while it is kept."""
        if not isinstance(flag, Lease) or not flag.writable:
            return None
        return byte_writer(flag, flag.addr + abi.TRIPPED_OFFSET + flag.index)

    def set_fail_answer(self, fail_answer: bool) -> None:
        self._fail_answer = fail_answer

    # -- readings -----------------------------------------------------------------------------
    def snapshot(self, flag: object, full: bool = True) -> Snapshot:
        assert isinstance(flag, Lease)
        if self.lost or flag.retired:
            raise AgentUnavailable(self.lost or "this rule was closed")
        s = read_consistent(flag.view)
        growth: dict[str, tuple[int, int]] = {}
        faults = events = None
        live = _round_trip(self, flag) if full else None
        if live is not None:
            counters = ask_stats(live[0], live[1], CONNECT_TIMEOUT)
            if counters:
                growth = {k: (int(v[0]) * PAGE_SIZE, int(v[1]) * PAGE_SIZE) for k, v in counters["growth"].items()}
                events = int(counters["events"])
                faults = int(counters["faults"]) if protocol.FAULT_HOOK in self.hooks else None
        oom_kills = int(s.oom_kills)
        if protocol.OOM_HOOK not in self.hooks:
            try:
                oom_kills = self.cgroup.oom_kills()
            except OSError:
                pass
        return Snapshot(**slot_readings(s, s.inactive_file_base, self._ancestors), oom_kills=oom_kills,
                        faults=faults, events=events, growth=growth)

    def _stats(self, sock: socket.socket) -> dict[str, Any] | None:
        """The counters, by a round trip on the lease's connection (see agent_maps.ask_stats)."""
        return ask_stats(sock, self._sock_lock, CONNECT_TIMEOUT)

    def room(self, flag: object) -> tuple[int | None, int | None]:
        """Word reads of the page (admission calls it on every request)."""
        assert isinstance(flag, Lease)
        w = flag.words
        return room_from_pages(w[abi.W_USAGE], w[abi.W_LIMIT], w[abi.W_HEADROOM],
                               w[W_INACTIVE_BASE] + w[abi.W_INACTIVE_DELTA], flag.rule,
                               w[abi.W_HIGH], w[abi.W_HIGH_ROOM])

    def trips(self, flag: object) -> int:
        if not isinstance(flag, Lease) or flag.retired:
            return 0
        return int(read_consistent(flag.view).trips[flag.index])

    def waker(self, flag: object, poll: float) -> Any:
        """The enforcer's wake, forwarded by the agent on a connection of its own (agent_wake.py)."""
        waker = waker_of(self, flag, poll)
        if waker is not None:
            WAKERS.add(waker)  # a forked child closes its copy and asks for its own (agent_own.py)
        return waker

    def thread_meter(self) -> Any:
        """The kernel's per-thread meter. Root clients: the agent's pinned ``threads`` array (this
        agent's: its pinned beat is the one we were passed). Others, or without pins: this cgroup's
        meter page, lent by the agent (agent_meter.py; the array holds every thread of the node)."""
        if self._meter is None:
            self._meter = thread_meter_from_pins(self._pin_dir, _map_id(self._beat_fd)) or shared_meter(self, _request)
        return self._meter or None

    def close(self) -> None:
        for lease in list(self._leases):
            self.remove_rule(lease, self._fail_answer)
        if self._beat_fd >= 0:
            os.close(self._beat_fd)
            self._beat_fd = -1
        if self._beat is not None:
            self._beat_mv = None
            try:
                self._beat.close()
            except BufferError:
                pass
            self._beat = None


def _round_trip(backend: AgentBackend, lease: Lease) -> tuple[socket.socket, threading.Lock] | None:
    """The connection (and its lock) for a request/response: the lease's, in the process that
    made the backend; in a forked child (a pre-fork worker) one of the child's own (agent_own.py),
    never the parent's lease, on which the two processes' replies would cross. None: no counters
    this time (no connection, or the agent refused this process one)."""
    if os.getpid() == backend.pid:
        return None if lease.sock is None else (lease.sock, backend._sock_lock)
    return own_connection(backend, _request)


def _rule_index(reply: dict[str, Any]) -> int:
    """The rule's index in the page, checked: a malformed reply is "unavailable", not a crash."""
    rules = reply.get("rules")
    index = rules[0] if isinstance(rules, list) and rules else None
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < abi.MAX_RULES:
        raise AgentUnavailable(f"the agent's reply names no usable rule ({rules!r})")
    return index


def _closed(sock: socket.socket) -> bool:
    """True when the agent closed the connection (it restarted or dropped us)."""
    try:
        data = sock.recv(protocol.MAX_MESSAGE, socket.MSG_DONTWAIT | socket.MSG_PEEK)
    except (BlockingIOError, TimeoutError):
        return False
    except OSError:
        return True
    return bool(data == b"")
