"""The kernel's own account of the demo's OOM kills: the OOM hook's event ring (what `rtml-ebpf
events` prints), read after each row, so every kill the table counts comes with its victim."""

from __future__ import annotations

from typing import Any

from .. import _cgroup
from .. import oom as _oom
from ..ebpf import hooks
from ..errors import RtmlError

RING_BYTES = 1 << 20  # a row's kills (tens) wait here until the row ends


class OomWitness:
    def __init__(self) -> None:
        self.why: str | None = None  # why there are no events (the hook is missing, ...)
        self._loaded: Any = None
        self._ring: Any = None
        try:
            from ..ebpf import loader, probes
            from ..ebpf.ring import OomRing

            hook = probes.BY_NAME[hooks.OOM_VICTIM]
            missing = probes.hook_unavailable(hook)
            if missing is not None:
                self.why = f"{missing}; the OOM kills are counted from memory.events only"
                return
            self.under = _cgroup.find_process_cgroup(require_accounting=False).path
            self._loaded = loader.load((hooks.OOM_VICTIM,), ring_bytes=RING_BYTES)
            self._ring = OomRing(self._loaded.fds["oom_events"])
        except (RtmlError, OSError) as exc:
            self.why = f"no OOM events: {exc}"
            self.close()

    def take(self) -> list[dict[str, Any]]:
        """The kills since the last call in cgroups under the demo's own (its rows' cgroups)."""
        if self._ring is None:
            return []
        kills = [_oom.from_event(e) for e in self._ring.drain()]
        return [k.as_dict() for k in kills if _oom.within(k.cgroup, self.under)]

    def close(self) -> None:
        if self._ring is not None:
            self._ring.close()
            self._ring = None
        if self._loaded is not None:
            self._loaded.close()
            self._loaded = None


def victims(events: list[dict[str, Any]]) -> tuple[int, int]:
    """(processes, further thread marks). mark_victim fires per thread: a thread of a process
    already killed that reaches the OOM killer while it exits is marked a victim again (the
    kernel's task_will_free_mem path), and the cgroup's oom_kill counter does not count it. A
    kill is a process: counted by pid, the two agree."""
    processes = len({e["pid"] for e in events})
    return processes, len(events) - processes


def summary(events: list[dict[str, Any]], kills: int | None = None) -> str:
    """``37 (python3, anon RSS up to 212 MiB)``: how many victim processes, who, how big
    (anonymous memory: what the cgroup was charged for; mapped files may be charged to
    whoever read them first); ``+N dying threads`` when threads of those were marked too;
    and, when ``kills`` (the cgroup's counter) differs from the processes, by how much."""
    if not events:
        return "0" if not kills else f"0 ({kills} kills with no hook event)"
    processes, marks = victims(events)
    comms = sorted({e["comm"] for e in events if e.get("comm")})
    anon = max((e.get("victim_rss_anon_bytes") or 0) for e in events)
    out = f"{processes} ({', '.join(comms[:2])}, anon RSS up to {anon >> 20} MiB)"
    if marks:
        out += f" +{marks} dying threads"
    if kills is not None and kills != processes:
        out += f"; counter {kills}: {processes - kills:+d} processes"
    return out


LEGEND = ("victims: processes the OOM hook saw chosen, one per OOM kill the cgroup counted; "
          "+N dying threads: threads of those processes that reached the OOM killer while exiting "
          "and were marked again (mark_victim fires per thread, the oom_kill counter once per process)")
