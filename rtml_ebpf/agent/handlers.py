"""The socket's ops, validated and answered: ``watch`` (rules on the client's cgroup, its page
and the beat passed back), ``events`` (a subscription to OOM kills), ``wake`` (the enforcer's
wake records, wakes.py) and ``stats`` (the cgroup's counters). The message format is protocol.py's.

A client's cgroup, and so what it may hold or see, comes from its connection's credentials
(peer.py), never from anything it sends; a root peer (uid 0 by the kernel's credentials) may name
another cgroup by its directory, as it may read any cgroup's files. Whatever is wrong raises ConfigError (or
CgroupNotFound, CapacityError) with what to do; conns.py turns it into the error reply.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from .. import _cgroup
from ..ebpf import abi
from ..ebpf.slots import encode_rule
from ..errors import CgroupNotFound, ConfigError
from . import peer as _peer
from . import protocol
from .conns import Conn
from .leases import Leases
from .oomfeed import OomFeed
from .programs import NodePrograms
from .wakes import WakeFeed

Send = Callable[[int, dict[str, Any], "list[int] | None"], None]  # (connection id, reply, fds to pass)


class Handlers:
    """One decoded request of one connection, answered through ``send``."""

    def __init__(self, leases: Leases, oom: OomFeed, node: NodePrograms, send: Send,
                 wakes: WakeFeed | None = None) -> None:
        self.leases = leases
        self.oom = oom
        self.wakes = wakes
        self.node = node
        self.send = send
        self.served = 0  # watch requests answered

    def handle(self, fd: int, conn: Conn, message: dict[str, Any]) -> None:
        if message.get("v") != protocol.VERSION:
            raise ConfigError(f"protocol version {message.get('v')!r}; this agent speaks {protocol.VERSION}")
        op = message.get("op")
        if conn.events_scope is not None:
            raise ConfigError("an events connection only listens; open another to ask anything else")
        if conn.wake_cgid:
            if op != "wake":
                raise ConfigError(f"op={op!r}: a wake connection only moves its level (\"wake\"); open another "
                                  "to ask anything else")
            self.move_wake(fd, conn, message)
        elif op == "wake" and not conn.keys:
            self.wake(fd, conn, message)
        elif op == "watch" and not conn.keys:
            self.watch(fd, conn, message)
        elif op == "events" and not conn.keys:
            self.events(fd, conn, message)
        elif op == "stats" and conn.keys:
            self.send(fd, self.stats(conn), None)
        elif op == "meter" and conn.keys and self.node.thread_pages is not None:
            from .meter_op import answer  # (here: the op's whole dispatch is these lines)

            answer(self.node.thread_pages, self.leases, fd, conn, message, self.send)
        else:
            raise ConfigError(f"op={op!r}: a new connection asks \"watch\", \"events\" or \"wake\" once; "
                              "then a watching one only \"stats\"")

    def watch(self, fd: int, conn: Conn, message: dict[str, Any]) -> None:
        named = _checked_fields(conn, message, {"v", "op", "scope", "rules"})
        scope = message.get("scope", "self")
        if scope not in protocol.SCOPES:
            raise ConfigError(f"scope={scope!r}: one of {', '.join(protocol.SCOPES)}")
        raw_rules = message.get("rules")
        if not isinstance(raw_rules, list) or not 1 <= len(raw_rules) <= protocol.MAX_RULES_PER_REQUEST:
            raise ConfigError(f"rules: a list of 1 to {protocol.MAX_RULES_PER_REQUEST} rules")
        rules = [protocol.rule_from_wire(r) for r in raw_rules]
        cg = _asked_cgroup(conn, named, scope)
        cgid = cg.cgroup_id
        state = self.leases.slot_for(cg, cgid, conn.peer.pid)
        conn.cgid = cgid
        indices = []
        try:
            for rule in rules:
                indices.append(self.leases.hold(state, rule, fd))
                conn.keys.append(encode_rule(rule))
        except BaseException:
            self.leases.release(fd, conn)
            raise
        page_fd = self.node.client_page(state.index)
        reply = {"ok": True, "cgroup": cg.directory, "cgroup_path": cg.path, "cgroup_id": cgid, "rules": indices,
                 "hooks": list(self.node.hooks), "page_map_id": self.node.page_map_id(state.index),
                 "abi": abi.ABI_VERSION, "upkeep": not self.node.memcg_events}
        self.send(fd, reply, [page_fd, self.node.beat_fd])
        self.served += 1

    def wake(self, fd: int, conn: Conn, message: dict[str, Any]) -> None:
        """Wake this connection when its cgroup's use reaches ``level``: the cgroup as ``watch``
        decides it (credentials; root may name one), and watched already."""
        if self.wakes is None or self.wakes.ring is None:
            raise ConfigError("this agent's programs have no wake ring (an older object or kernel): poll instead")
        named = _checked_fields(conn, message, {"v", "op", "scope", "level"})
        level = protocol.wake_level(message.get("level"))
        scope = message.get("scope", "self")
        if scope not in protocol.SCOPES:
            raise ConfigError(f"scope={scope!r}: one of {', '.join(protocol.SCOPES)}")
        cg = _asked_cgroup(conn, named, scope)
        cgid = cg.cgroup_id
        if cgid not in self.leases.slots.by_cgid:
            raise CgroupNotFound(f"cgroup {cg.path} is not watched by the agent: watch it first (a Limiter on it)")
        conn.wake_cgid = cgid
        self.wakes.ask(fd, cgid, level)
        self.send(fd, {"ok": True, "cgroup_id": cgid}, None)

    def move_wake(self, fd: int, conn: Conn, message: dict[str, Any]) -> None:
        """A new level on a wake connection (no reply: the client's enforcer does not wait)."""
        extra = set(message) - {"v", "op", "level"}
        if extra:
            raise ConfigError(f"unknown fields {sorted(extra)}: a wake connection sends only its level")
        assert self.wakes is not None
        self.wakes.ask(fd, conn.wake_cgid, protocol.wake_level(message.get("level")))

    def events(self, fd: int, conn: Conn, message: dict[str, Any]) -> None:
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
        self.send(fd, {"ok": True, "source": self.oom.source, "scope": seen or "/", "note": self.oom.note}, None)

    def stats(self, conn: Conn) -> dict[str, Any]:
        state = self.leases.slots.by_cgid.get(conn.cgid)
        if state is None:
            raise CgroupNotFound("the cgroup is no longer watched (removed)")
        c = self.leases.slots.read_counters(state.index)
        return {"ok": True, "faults": int(c.faults), "events": int(c.events),
                "growth": {k: [int(getattr(c, f"{k}_charged")), int(getattr(c, f"{k}_uncharged"))]
                           for k in abi.GROWTH_KINDS}}


def _checked_fields(conn: Conn, message: dict[str, Any], allowed: set[str]) -> object:
    """Refuse fields beyond ``allowed`` (naming a cgroup, path or pid above all: the agent decides
    the cgroup from the credentials); return the cgroup a root peer named, else None."""
    extra = set(message) - allowed
    named = message.get("cgroup") if conn.peer.uid == 0 else None  # root may name any cgroup
    if named is not None:
        extra.discard("cgroup")
    if extra & {"cgroup", "pid", "cgroup_id", "path"}:
        raise ConfigError("the agent decides your cgroup from your connection's credentials; "
                          "send no cgroup, path or pid (root may send \"cgroup\": a directory)")
    if extra:
        raise ConfigError(f"unknown request fields {sorted(extra)}")
    return named


def _asked_cgroup(conn: Conn, named: object, scope: str) -> _cgroup.MemoryCgroup:
    """The cgroup a request is about: the one a root peer named, else the peer's own (or its pod's)."""
    if named is not None:
        return _named_cgroup(named, conn.peer)
    cg = _peer.cgroup_of(conn.peer)
    return _peer.pod_ancestor(cg) if scope == "pod" else cg


def _named_cgroup(value: object, peer: _peer.Peer) -> _cgroup.MemoryCgroup:
    """A cgroup a root client named: a directory under a memory cgroup mount, the same cgroup in
    the agent's mount namespace and in the client's. So the name reaches only what the client
    could read itself: a pod's root (uid 0 without a user namespace) sees its own cgroup
    namespace's files, where another pod's directory is absent or another cgroup."""
    if not isinstance(value, str) or not value.startswith("/") or len(value) > protocol.MAX_PATH or "\0" in value:
        raise ConfigError(f"cgroup={str(value)[:80]!r}: an absolute directory path of a memory cgroup, "
                          f"at most {protocol.MAX_PATH} characters")
    cg = _cgroup.cgroup_from_directory(value)
    try:
        theirs = os.stat(f"/proc/{peer.pid}/root{os.path.normpath(value)}").st_ino if peer.pid > 0 else -1
    except OSError:
        theirs = -1
    if theirs != cg.cgroup_id or (peer.pidfd >= 0 and not _peer.alive(peer.pidfd)):
        raise CgroupNotFound(f"cgroup={value!r}: not the same cgroup where your process sees it; name a memory "
                             "cgroup directory as your mount namespace shows it (the host's, for a host service)")
    return cg
