"""P3, probe overhead per hook set: the fault storm (storm.c) with no program, with the set's
empty floor programs (floor.bpf.c) and with rtml watching the storm's cgroup and another one,
interleaved; per-event program run time from the kernel's BPF run-time accounting."""

from __future__ import annotations

import functools
import os
import subprocess
from typing import Any

from benchmarks.common import HERE, HOOK_SETS, MiB, med, spread
from benchmarks.faultstorm import PAGES, bpf_run_stats, bpf_stats_setting, compile_storm, set_bpf_stats, storm_seconds

FLOORS = {"memcg": (b"floor_lruvec", b"floor_state"), "lean": (b"floor_fault", b"floor_alloc")}
# Another build of rtml.bpf.o (say, the previous commit's) timed beside the packaged one in the
# same interleaved rounds: a before/after figure that the machine's drift between runs cannot bend.
BEFORE_ENV = "RTML_P3_OBJECT_BEFORE"


class FloorPrograms:
    """Empty programs on the same tracepoints (benchmarks/floor.bpf.c): what the kernel charges
    for running any BPF program there, before rtml does any work. Loaded by rtml's own loader."""

    def __init__(self, out_dir: str, hook_set: str = "memcg") -> None:
        from rtml_ebpf.ebpf.loader import open_load_attach

        obj_path = os.path.join(out_dir, "floor.bpf.o")
        subprocess.run(["clang", "-g", "-O2", "-target", "bpf", "-I", os.path.join(HERE, "..", "bpf"), "-c",
                        os.path.join(HERE, "floor.bpf.c"), "-o", obj_path], check=True)
        wanted = [n.decode() for n in FLOORS[hook_set]]
        others = tuple(n.decode() for names in FLOORS.values() for n in names if n.decode() not in wanted)
        self.loaded = open_load_attach(obj_path, {n: n for n in wanted}, others)

    def close(self) -> None:
        self.loaded.close()


def _storm_with_object(path: str, cg: Any, run_storm: Any) -> float:
    """One storm in ``cg`` with rtml watching it from the object at ``path`` (RTML_HOOKS as set)."""
    import rtml_ebpf
    from rtml_ebpf.ebpf import loader

    packaged, loader.OBJECT_PATH = loader.OBJECT_PATH, path
    try:
        with rtml_ebpf.Limiter(cg.directory, backend="ebpf", relief=False):
            seconds: float = run_storm(cg)
        return seconds
    finally:
        loader.OBJECT_PATH = packaged


def p3_probe_overhead(reps: int, tmp: str) -> dict[str, Any]:
    """Per hook set: the storm with no program, with the set's empty floor programs, and with
    rtml watching the storm's cgroup (and another one), interleaved; per-event run time."""
    import rtml_ebpf
    from benchmarks.cgroups import ChildCgroup
    from rtml_ebpf.ebpf.runtime import Runtime

    run_storm = functools.partial(storm_seconds, compile_storm(tmp))
    set_stats, pages = set_bpf_stats, PAGES
    stats_before = bpf_stats_setting()
    base: list[float] = []
    runs: dict[str, dict[str, list[float]]] = {h: {"floor": [], "bpf": [], "unwatched": [], "before": []}
                                               for h in HOOK_SETS}
    before_obj = os.environ.get(BEFORE_ENV)
    per_event: dict[str, dict[str, list[float]]] = {h: {} for h in HOOK_SETS}
    hooks_seen: dict[str, list[str]] = {}
    env_before = os.environ.get("RTML_HOOKS")
    try:
        with ChildCgroup(512 * MiB, prefix="rtml-bench") as cg, ChildCgroup(512 * MiB, prefix="rtml-bench") as other:
            run_storm(cg)  # warm-up
            for _ in range(reps):
                # Wall time with run-time accounting off (it adds two clock reads per program run).
                set_stats("0")
                base.append(run_storm(cg))
                for hook_set, env in HOOK_SETS.items():
                    floor_progs = FloorPrograms(tmp, hook_set)
                    try:
                        runs[hook_set]["floor"].append(run_storm(cg))
                    finally:
                        floor_progs.close()
                    os.environ["RTML_HOOKS"] = env
                    with rtml_ebpf.Limiter(cg.directory, backend="ebpf", relief=False) as lim:
                        runs[hook_set]["bpf"].append(run_storm(cg))
                        runs[hook_set]["unwatched"].append(run_storm(other))
                        rt = Runtime.current()
                        assert rt is not None
                        set_stats("1")
                        before = bpf_run_stats(rt.prog_ids)
                        run_storm(cg)
                        after = bpf_run_stats(rt.prog_ids)
                        set_stats("0")
                        hooks_seen[hook_set] = list(lim.stats().hooks)
                    if before_obj:
                        runs[hook_set]["before"].append(_storm_with_object(before_obj, cg, run_storm))
                    for name in hooks_seen[hook_set]:
                        dt = after[name][0] - before[name][0]
                        dn = after[name][1] - before[name][1]
                        if dn:
                            per_event[hook_set].setdefault(name, []).append(dt / dn)
                            per_event[hook_set].setdefault(name + " events per fault", []).append(dn / pages)
    finally:
        set_stats(stats_before)
        if env_before is None:
            os.environ.pop("RTML_HOOKS", None)
        else:
            os.environ["RTML_HOOKS"] = env_before

    def pct(xs: list[float]) -> tuple[float, str]:
        ratios = [x / b for x, b in zip(xs, base, strict=True)]
        return (med(ratios) - 1) * 100, spread([(r - 1) * 100 for r in ratios])

    sets = {}
    for hook_set, r in runs.items():
        overhead, overhead_spread = pct(r["bpf"])
        floor, floor_spread = pct(r["floor"])
        unwatched, unwatched_spread = pct(r["unwatched"])
        if r["before"]:
            was, was_spread = pct(r["before"])
            paired = [(b - a) / base_s * 100 for a, b, base_s in zip(r["bpf"], r["before"], base, strict=True)]
        sets[hook_set] = {
            "hooks": hooks_seen.get(hook_set, []),
            "overhead_pct": overhead, "overhead_spread_pct": overhead_spread,
            "floor_overhead_pct": floor, "floor_spread_pct": floor_spread,
            "unwatched_overhead_pct": unwatched, "unwatched_spread_pct": unwatched_spread,
            "per_event": {k: {"median": med(v), "spread": spread(v)} for k, v in per_event[hook_set].items()},
        }
        if r["before"]:
            sets[hook_set].update(before_object=before_obj, before_overhead_pct=was,
                                  before_spread_pct=was_spread, before_minus_after_pct=med(paired),
                                  before_minus_after_spread_pct=spread(paired))
    return {"pages_per_run": pages, "base_s": med(base), "fault_us_base": med(base) / pages * 1e6, "sets": sets}
