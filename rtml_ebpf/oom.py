"""OOM kill events: what the kernel's OOM killer chose, as one record per victim.

Two sources, one record shape:

* ``bpf``: the mark_victim hook (6.8+) writes each victim into the `oom_events` ring
  buffer at the moment it is chosen: pid, comm, the victim's RSS, its cgroup (by name, so a
  container removed right after is still named) and the usage and limit of the cgroup on its
  path with the least room, the one that ran out.
* ``memory.events``: kernels without that hook. The oom_kill counters of the watched cgroups
  are read every COUNT_INTERVAL; a rise becomes a record with ``count`` and no pid, and the
  usage read after the kill. Said so in the record (``source``) and by whoever reads it.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from . import _cgroup
from ._kube import pod_labels
from .config import PAGE_SIZE
from .ebpf import abi

COUNT_INTERVAL = 1.0  # seconds between reads of the oom_kill counters (memory.events source)
NO_HOOK = ("this kernel has no mark_victim tracepoint with its task (Linux 6.8+): OOM kills are counted from "
           f"memory.events of the watched cgroups every {COUNT_INTERVAL:g} s, without pid, comm or RSS")


@dataclass(frozen=True)
class OomKill:
    """One OOM victim (``count`` 1), or a rise of a cgroup's oom_kill counter (memory.events)."""

    source: str  # "bpf" or "memory.events"
    time: float  # wall clock, seconds since the epoch
    monotonic_ns: int  # CLOCK_MONOTONIC of the kill (bpf) or of the reading (memory.events)
    cgroup: str  # the victim's memory cgroup path (the counter's cgroup for memory.events)
    cgroup_id: int
    limit_cgroup: str | None  # the cgroup on the path that ran out of room; None: no limit on the path
    usage_bytes: int | None
    limit_bytes: int | None
    pid: int | None = None
    tid: int | None = None
    comm: str | None = None
    rss_anon_bytes: int | None = None
    rss_file_bytes: int | None = None
    rss_shmem_bytes: int | None = None
    count: int = 1
    truncated: bool = False  # the path is not whole: deeper than the event carries (its top is cut:
    # "/..."), or a level's name longer than RTML_EVENT_NAME (cut at that length)

    @property
    def rss_bytes(self) -> int | None:
        if self.rss_anon_bytes is None:
            return None
        return self.rss_anon_bytes + (self.rss_file_bytes or 0) + (self.rss_shmem_bytes or 0)

    def as_dict(self) -> dict[str, Any]:
        """Stable JSON keys (the README documents them), with kubelet labels of the path."""
        pod = pod_labels(self.cgroup)
        return {
            "event": "oom_kill",
            "source": self.source,
            "time": round(self.time, 6),
            "pid": self.pid,
            "tid": self.tid,
            "comm": self.comm,
            "cgroup": self.cgroup,
            "cgroup_id": self.cgroup_id,
            "pod_uid": pod.pod_uid if pod else None,
            "container_id": pod.container_id if pod else None,
            "qos": pod.qos if pod else None,
            "runtime": pod.runtime if pod else None,
            "limit_cgroup": self.limit_cgroup,
            "usage_bytes": self.usage_bytes,
            "limit_bytes": self.limit_bytes,
            "victim_rss_bytes": self.rss_bytes,
            "victim_rss_anon_bytes": self.rss_anon_bytes,
            "victim_rss_file_bytes": self.rss_file_bytes,
            "victim_rss_shmem_bytes": self.rss_shmem_bytes,
            "count": self.count,
            "path_truncated": self.truncated,
        }


def within(path: str, scope: str) -> bool:
    """``path`` is ``scope`` or below it."""
    return path == scope or path.startswith(scope.rstrip("/") + "/")


def _names(ev: abi.OomEvent) -> list[str]:
    """The path's levels, root first (the event carries them leaf first)."""
    levels = min(int(ev.levels), abi.EVENT_DEPTH)
    return [ev.names[i].value.decode("utf-8", "replace") for i in reversed(range(levels))]


def _join(parts: list[str], truncated: bool) -> str:
    return ("/..." if truncated else "") + "/" + "/".join(parts) if parts else ("/..." if truncated else "/")


def from_event(ev: abi.OomEvent) -> OomKill:
    """A ring-buffer record as an OomKill."""
    parts = _names(ev)
    truncated = bool(ev.flags & abi.EVENT_TRUNCATED)
    limited = ev.limit_pages < abi.UNLIMITED_PAGES
    limit_cgroup = None
    if limited:
        keep = len(parts) - int(ev.limit_depth)
        limit_cgroup = _join(parts[: max(0, keep)], truncated)
    mono_now = time.monotonic_ns()
    return OomKill(
        source="bpf",
        time=time.time() - max(0, mono_now - int(ev.time_ns)) / 1e9,
        monotonic_ns=int(ev.time_ns),
        cgroup=_join(parts, truncated),
        cgroup_id=int(ev.cgroup_id),
        limit_cgroup=limit_cgroup,
        usage_bytes=int(ev.usage_pages) * PAGE_SIZE,
        limit_bytes=int(ev.limit_pages) * PAGE_SIZE if limited else None,
        pid=int(ev.pid),
        tid=int(ev.tid),
        comm=ev.comm.decode("utf-8", "replace"),
        rss_anon_bytes=int(ev.rss_anon_pages) * PAGE_SIZE,
        rss_file_bytes=int(ev.rss_file_pages) * PAGE_SIZE,
        rss_shmem_bytes=int(ev.rss_shmem_pages) * PAGE_SIZE,
        truncated=truncated or bool(ev.flags & abi.EVENT_NAME_CUT),
    )


def _path_of(cg: _cgroup.MemoryCgroup, directory: str | None) -> str | None:
    """The cgroup path of ``directory``, an ancestor of ``cg`` (the limit's source)."""
    if directory is None or not cg.directory.startswith(directory):
        return None
    tail = cg.directory[len(directory):]  # "" or "/child/..."
    if tail and not tail.startswith("/"):
        return None
    return (cg.path[: len(cg.path) - len(tail)] if tail else cg.path) or "/"


class CountedOoms:
    """The memory.events source: rises of each cgroup's oom_kill counter since last read."""

    def __init__(self) -> None:
        self.seen: dict[int, int] = {}  # cgroup id -> oom_kill count at the last read

    def read(self, cgroups: Iterable[tuple[int, _cgroup.MemoryCgroup]]) -> list[OomKill]:
        out: list[OomKill] = []
        present: set[int] = set()
        for cgid, cg in cgroups:
            present.add(cgid)
            try:
                count = cg.oom_kills()
            except OSError:
                continue  # removed meanwhile
            before = self.seen.get(cgid)
            self.seen[cgid] = count
            if before is None or count <= before:
                continue  # the first reading is the baseline
            usage: int | None = None
            limit = _cgroup.LimitInfo(None, None, ())
            try:
                usage, limit = cg.read_usage(), cg.effective_limit()
            except (OSError, ValueError):
                pass
            out.append(OomKill(source="memory.events", time=time.time(), monotonic_ns=time.monotonic_ns(),
                               cgroup=cg.path, cgroup_id=cgid, limit_cgroup=_path_of(cg, limit.source),
                               usage_bytes=usage, limit_bytes=limit.limit_bytes, count=count - before))
        for gone in set(self.seen) - present:
            del self.seen[gone]
        return out
