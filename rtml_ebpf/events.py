"""``rtml-ebpf events``: OOM kills as JSON lines, from the node agent or from programs of our own.

From the agent (its socket is there): the agent owns the node's one event ring and forwards
each kill to subscribers; root sees every cgroup, anyone else only the cgroup it runs in (or
its pod), as the agent decides from the connection's credentials.

Standalone (no agent, root): this process loads the programs with only the OOM hook and reads
the ring itself. Two readers of one ring steal each other's events, which is why a node with an
agent goes through it. On a kernel without the hook both count from memory.events (oom.py).
"""

from __future__ import annotations

import fnmatch
import logging
import os
import selectors
import socket
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

from . import oom as _oom
from .ebpf import hooks
from .errors import AgentUnavailable, ConfigError, PermissionDenied

log = logging.getLogger("rtml_ebpf")

STANDALONE_RING_BYTES = 256 * 1024
Note = Callable[[str], None]


def from_agent(path: str, scope: str = "self", note: Note | None = None) -> Iterator[dict[str, Any]]:
    """OOM kill records from the agent at ``path`` as they happen (a generator; never ends
    on its own). AgentUnavailable when there is no agent or it refuses."""
    from .agent import protocol

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        try:
            sock.settimeout(2.0)
            sock.connect(path)
            sock.send(protocol.encode({"v": protocol.VERSION, "op": "events", "scope": scope}))
            reply = protocol.decode(sock.recv(protocol.MAX_MESSAGE + 1))
        except OSError as exc:
            raise AgentUnavailable(f"cannot subscribe at {path}: {exc.strerror or exc}") from None
        if not reply.get("ok"):
            raise AgentUnavailable(f"the agent at {path} refused: {reply.get('error')}")
        if note is not None:
            note(f"rtml-ebpf: OOM kills from the agent at {path}, cgroups under {reply.get('scope')}, source "
                 f"{reply.get('source')}" + (f" ({reply['note']})" if reply.get("note") else ""))
        sock.settimeout(None)
        while True:
            data = sock.recv(protocol.MAX_MESSAGE + 1)
            if not data:
                raise AgentUnavailable(f"the agent at {path} closed the connection (stopped?)")
            record = protocol.decode(data)
            if record.get("ok") is False:
                raise AgentUnavailable(f"the agent at {path}: {record.get('error')}")
            yield record
    finally:
        sock.close()


def standalone(globs: tuple[str, ...] = (), note: Note | None = None) -> Iterator[dict[str, Any]]:
    """OOM kill records from programs this process loads (root). ``globs`` name the cgroups the
    memory.events source reads on kernels without the hook (default: every limited one)."""
    from .ebpf import probes

    hook = probes.BY_NAME[hooks.OOM_VICTIM]
    probes.check_privileges()
    probes.check_btf()
    why = probes.hook_unavailable(hook)
    if why is None:
        yield from _from_ring(note)
    else:
        if note is not None:
            note(f"rtml-ebpf: {_oom.NO_HOOK} ({why})")
        yield from _from_counters(globs)


def _from_ring(note: Note | None) -> Iterator[dict[str, Any]]:
    from .ebpf import loader
    from .ebpf.ring import OomRing

    loaded = loader.load((hooks.OOM_VICTIM,), ring_bytes=STANDALONE_RING_BYTES)
    ring = None
    sel = selectors.DefaultSelector()
    try:
        ring = OomRing(loaded.fds["oom_events"])
        sel.register(ring.fileno(), selectors.EVENT_READ)
        if note is not None:
            note(f"rtml-ebpf: OOM kills from programs of this process (pid {os.getpid()}), every cgroup, "
                 "source bpf")
        while True:
            sel.select(1.0)
            for ev in ring.drain():
                yield _oom.from_event(ev).as_dict()
    finally:
        sel.close()
        if ring is not None:
            ring.close()
        loaded.close()


def _from_counters(globs: tuple[str, ...]) -> Iterator[dict[str, Any]]:
    from .agent.scan import Scanner, memory_mount

    scanner = Scanner(memory_mount(), globs, follow=False)
    counted = _oom.CountedOoms()
    try:
        while True:
            scanner.tick()
            scanner.changes()
            cgroups = []
            for cgid in list(scanner.wanted):
                directory = scanner.present.get(cgid)
                if directory is not None:
                    cgroups.append((cgid, scanner.cgroup_at(directory)))
            for kill in counted.read(cgroups):
                yield kill.as_dict()
            time.sleep(_oom.COUNT_INTERVAL)
    finally:
        scanner.close()


def choose(source: str, socket_path: str, scope: str, globs: tuple[str, ...],
           note: Note | None) -> Iterator[dict[str, Any]]:
    """``source``: "agent", "standalone" or "auto" (the agent when its socket is there, else
    standalone when root)."""
    if source not in ("auto", "agent", "standalone"):
        raise ConfigError(f"--source={source!r}: auto, agent or standalone")
    if source == "agent" or (source == "auto" and os.path.exists(socket_path)):
        return from_agent(socket_path, scope, note)
    if source == "auto" and os.geteuid() != 0:
        raise PermissionDenied(f"no agent socket at {socket_path}, and reading OOM kills without the agent needs "
                               "root (it loads BPF programs): start `rtml-ebpf agent` or run as root")
    return standalone(globs, note)


def run(source: str, socket_path: str, scope: str, globs: tuple[str, ...], count: int | None,
        timeout: float | None) -> int:
    """Print records as JSON lines until ``count`` were printed or ``timeout`` seconds passed;
    ``globs`` keep the records whose cgroup path matches one."""
    import json
    import signal

    if count is not None and count < 1:
        raise ConfigError(f"--count={count}: a whole number >= 1")
    if timeout is not None and timeout <= 0:
        raise ConfigError(f"--timeout={timeout}: seconds > 0")

    def note(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    def on_alarm(signum: int, frame: object) -> None:
        raise TimeoutError

    records = choose(source, socket_path, scope, globs, note)
    printed = 0
    if timeout is not None:
        signal.signal(signal.SIGALRM, on_alarm)
        signal.setitimer(signal.ITIMER_REAL, timeout)
    try:
        for record in records:
            if globs and not any(fnmatch.fnmatchcase(record.get("cgroup") or "", g) for g in globs):
                continue
            print(json.dumps(record, separators=(",", ":")), flush=True)
            printed += 1
            if count is not None and printed >= count:
                break
    except TimeoutError:
        pass
    finally:
        if timeout is not None:
            signal.setitimer(signal.ITIMER_REAL, 0)
        close = getattr(records, "close", None)
        if close is not None:
            close()
    return 0
