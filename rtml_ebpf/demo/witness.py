"""The kernel's own account of the demo's OOM kills: the OOM hook's event ring (what `rtml-ebpf
events` prints), read after each row, so every kill the table counts comes with its victim."""

from __future__ import annotations

from typing import Any

from .. import _cgroup
from .. import oom as _oom
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

            hook = next(h for h in probes.HOOKS if h.name == "oom_victim")
            missing = probes.hook_unavailable(hook)
            if missing is not None:
                self.why = f"{missing}; the OOM kills are counted from memory.events only"
                return
            self.under = _cgroup.find_process_cgroup(require_accounting=False).path
            self._loaded = loader.load(("oom_victim",), ring_bytes=RING_BYTES)
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


def summary(events: list[dict[str, Any]]) -> str:
    """``37 (python3, anon RSS up to 212 MiB)``: how many victims, who, how big (anonymous memory:
    what the cgroup was charged for; mapped files may be charged to whoever read them first)."""
    if not events:
        return "0"
    comms = sorted({e["comm"] for e in events if e.get("comm")})
    anon = max((e.get("victim_rss_anon_bytes") or 0) for e in events)
    return f"{len(events)} ({', '.join(comms[:2])}, anon RSS up to {anon >> 20} MiB)"
