"""Memory pressure (PSI) of a cgroup: ``memory.pressure`` (cgroup v2, 4.20+ with CONFIG_PSI).

``some`` is the share of wall time in which at least one task of the cgroup stalled on memory
(reclaim, refaults of thrashed pages, swap-in), ``full`` the share in which all of them did.
A cgroup full of cold page cache stalls little; one that thrashes stalls a lot: the signal
that usage cannot give. On cgroup v1 there is no per-cgroup file; the system-wide
``/proc/pressure/memory`` is not the cgroup's and is never reported in its place.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from ._cgroup import MemoryCgroup, read_text


@dataclass(frozen=True)
class Pressure:
    """One reading of memory.pressure: averages in percent, totals in microseconds."""

    some_avg10: float
    some_total_us: int
    full_avg10: float
    full_total_us: int


def parse_pressure(text: str) -> Pressure:
    """``some avg10=0.00 avg60=0.00 avg300=0.00 total=0`` and the ``full`` line."""
    fields: dict[str, dict[str, str]] = {}
    for line in text.splitlines():
        kind, _, rest = line.partition(" ")
        fields[kind] = dict(kv.split("=", 1) for kv in rest.split() if "=" in kv)
    some, full = fields.get("some", {}), fields.get("full", {})
    return Pressure(float(some.get("avg10", 0.0)), int(some.get("total", 0)),
                    float(full.get("avg10", 0.0)), int(full.get("total", 0)))


def pressure_file(cgroup: MemoryCgroup, directory: str | None = None) -> str:
    return os.path.join(directory or cgroup.directory, "memory.pressure")


def absent_reason(cgroup: MemoryCgroup) -> str:
    """Why a cgroup has no memory.pressure to read."""
    if cgroup.version == 1:
        system = "present" if os.path.exists("/proc/pressure/memory") else "absent"
        return (f"cgroup v1 has no per-cgroup memory.pressure (the system-wide /proc/pressure/memory is {system} "
                "and is not this cgroup's): run on cgroup v2 for pressure")
    if not os.path.exists("/proc/pressure/memory"):
        return "this kernel has no PSI (CONFIG_PSI off, or psi=0 on the kernel command line)"
    return f"{pressure_file(cgroup)} is missing (the v2 root cgroup, or the cgroup was removed)"


def read_pressure(cgroup: MemoryCgroup) -> tuple[Pressure | None, str | None]:
    """(the reading, None) or (None, why there is none). Never raises for a missing file."""
    if cgroup.version == 1:
        return None, absent_reason(cgroup)
    try:
        text = read_text(pressure_file(cgroup))
    except FileNotFoundError:
        return None, absent_reason(cgroup)
    except OSError as exc:  # EOPNOTSUPP where PSI is compiled in but disabled
        return None, f"{pressure_file(cgroup)}: {exc.strerror or exc}"
    return parse_pressure(text), None
