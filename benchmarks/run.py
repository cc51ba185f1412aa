"""``make bench``: every performance figure rtml-ebpf claims, measured in one run.

P1 check cost, P2 overshoot, P3 probe overhead per hook set, P4 start-up, P5 flood survival
(the demo), P6 admission (overhead, cost error, goodput), P7 overhead a real service sees,
P8 precision per hook set (time to clear after a free, working-set error), P9 the node agent
at scale (1,000 watched cgroups: RSS, register latency, storm overhead, per-event run time),
P10 the node view, P11 node cost against the number of guarded processes (1, 8, 32; shared load,
node agent, own loads), P12 request-level admission (time to end an overrunning request,
goodput of a heavy-tail upload flood). This machine is noisy: variants are interleaved, repeated, and reported as
median and spread (min-max). Ratios are taken against baselines from the
same run. Nothing here is asserted: the report states figures and targets.

    python -m benchmarks.run [--quick] [--only P1,P3] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import timeit
from collections.abc import Callable
from typing import Any

import psutil

from benchmarks.agent_scale import p9_agent_scale
from benchmarks.faultstorm import PAGES, bpf_run_stats, bpf_stats_setting, compile_storm, set_bpf_stats, storm_seconds
from benchmarks.node_cost import p11_node_cost
from benchmarks.node_view import p10_node_view
from benchmarks.requests_bench import p12_requests

MiB = 1 << 20
HERE = os.path.dirname(os.path.abspath(__file__))


def med(xs: list[float]) -> float:
    return statistics.median(xs)


def spread(xs: list[float]) -> str:
    return f"{min(xs):.4g}–{max(xs):.4g}"


def machine() -> dict[str, Any]:
    cpu = "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "?")
    except OSError:
        pass
    return {"kernel": platform.release(), "cpu": cpu, "cores": os.cpu_count(),
            "memory_gib": round(psutil.virtual_memory().total / 2**30, 1), "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


# -- P1 -------------------------------------------------------------------------------------
class _Empty:
    def method(self) -> bool:
        return False


def p1_check_cost(reps: int, number: int) -> dict[str, Any]:
    import rtml_ebpf

    ebpf = rtml_ebpf.Limiter(backend="ebpf")
    poll = rtml_ebpf.Limiter(backend="poll")  # default 10 ms cache
    poll0 = rtml_ebpf.Limiter(backend="poll", poll_interval=0)
    usage_file = os.path.join(ebpf.cgroup.directory, ebpf.cgroup.usage_file)
    proc = psutil.Process()
    empty = _Empty()

    def read_file() -> bool:
        with open(usage_file) as f:
            return int(f.read()) > 0

    # Each variant is timed as a caller writes it: attribute lookup plus call.
    env = {"empty": empty, "ebpf": ebpf, "poll": poll, "poll0": poll0, "rtml_ebpf": rtml_ebpf,
           "read_file": read_file, "proc": proc}
    variants: dict[str, tuple[str, int]] = {
        "empty method call": ("empty.method()", number),
        "ebpf Limiter.is_mem_limit_reached": ("ebpf.is_mem_limit_reached()", number),
        "rtml_ebpf.is_mem_limit_reached (module)": ("rtml_ebpf.is_mem_limit_reached()", number),
        "poll Limiter (10 ms cache)": ("poll.is_mem_limit_reached()", number),
        "poll Limiter (no cache)": ("poll0.is_mem_limit_reached()", max(1, number // 200)),
        "direct read of the usage file": ("read_file()", max(1, number // 200)),
        "psutil RSS": ("proc.memory_info().rss", max(1, number // 200)),
    }
    rtml_ebpf.configure(backend="ebpf")
    rtml_ebpf.is_mem_limit_reached()
    samples: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(reps):  # interleaved
        for name, (stmt, n) in variants.items():
            samples[name].append(timeit.timeit(stmt, number=n, globals=env) / n * 1e9)
    for lim in (ebpf, poll, poll0):
        lim.close()
    rtml_ebpf.configure(backend="auto")
    rows = {k: {"median_ns": med(v), "spread_ns": spread(v)} for k, v in samples.items()}
    e = rows["ebpf Limiter.is_mem_limit_reached"]["median_ns"]
    return {
        "rows": rows,
        "file_read_over_ebpf": rows["direct read of the usage file"]["median_ns"] / e,
        "ebpf_over_empty": e / rows["empty method call"]["median_ns"],
        "psutil_over_ebpf": rows["psutil RSS"]["median_ns"] / e,
        "poll_nocache_over_ebpf": rows["poll Limiter (no cache)"]["median_ns"] / e,
    }


# -- P2 -------------------------------------------------------------------------------------
def p2_overshoot(reps: int) -> dict[str, Any]:
    from rtml_ebpf._sandbox import ChildCgroup

    limit, threshold, max_mib = 1024 * MiB, 256 * MiB, 700
    variants = {"ebpf": ("ebpf", None), "ebpf (lean hooks)": ("ebpf-lean", None), "poll 10 ms": ("poll", 0.010),
                "poll 100 ms": ("poll", 0.100), "poll 1 s": ("poll", 1.0)}
    results: dict[str, list[dict[str, Any]]] = {k: [] for k in variants}
    for _ in range(reps):
        for name, (backend, interval) in variants.items():
            with ChildCgroup(limit, prefix="rtml-bench") as cg:
                args = [sys.executable, os.path.join(HERE, "workloads.py"), "alloc", "--threshold", str(threshold),
                        "--backend", backend.split("-")[0], "--metric", "usage", "--step-kib", "1024",
                        "--max-mib", str(max_mib), "--fast"]
                if interval is not None:
                    args += ["--poll-interval", str(interval)]
                env = {"RTML_HOOKS": "lean"} if backend.endswith("lean") else {}
                p = cg.popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                out, err = p.communicate(timeout=300)
                if p.returncode != 0:
                    raise RuntimeError(f"P2 {name}: workload failed: {err[-2000:]}")
                r = json.loads(out.strip().splitlines()[-1])
                rate = r["allocated"] / r["seconds"] / MiB if r["seconds"] else 0.0
                results[name].append({"overshoot": r["overshoot"], "tripped": r["tripped"], "rate_mib_s": rate,
                                      "allocated": r["allocated"]})
    rows = {}
    for name, rs in results.items():
        flipped = [x["overshoot"] / MiB for x in rs if x["tripped"]]
        rows[name] = {
            "median_mib": med(flipped) if flipped else None,
            "spread_mib": spread(flipped) if flipped else "-",
            "not_flipped": sum(not x["tripped"] for x in rs),
            "rate_mib_s": med([x["rate_mib_s"] for x in rs]),
        }
    return {"limit": limit, "threshold": threshold, "max_mib": max_mib, "rows": rows}


# -- P3 -------------------------------------------------------------------------------------
FLOORS = {"memcg": (b"floor_lruvec", b"floor_state"), "lean": (b"floor_fault",)}


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


HOOK_SETS = {"memcg": "auto", "lean": "lean"}  # report name -> RTML_HOOKS


def p3_probe_overhead(reps: int, tmp: str) -> dict[str, Any]:
    """Per hook set: the storm with no program, with the set's empty floor programs, and with
    rtml watching the storm's cgroup (and another one), interleaved; per-event run time."""
    import rtml_ebpf
    from rtml_ebpf._sandbox import ChildCgroup
    from rtml_ebpf.ebpf.runtime import Runtime

    run_storm = functools.partial(storm_seconds, compile_storm(tmp))
    set_stats, pages = set_bpf_stats, PAGES
    stats_before = bpf_stats_setting()
    base: list[float] = []
    runs: dict[str, dict[str, list[float]]] = {h: {"floor": [], "bpf": [], "unwatched": []} for h in HOOK_SETS}
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
        sets[hook_set] = {
            "hooks": hooks_seen.get(hook_set, []),
            "overhead_pct": overhead, "overhead_spread_pct": overhead_spread,
            "floor_overhead_pct": floor, "floor_spread_pct": floor_spread,
            "unwatched_overhead_pct": unwatched, "unwatched_spread_pct": unwatched_spread,
            "per_event": {k: {"median": med(v), "spread": spread(v)} for k, v in per_event[hook_set].items()},
        }
    return {"pages_per_run": pages, "base_s": med(base), "fault_us_base": med(base) / pages * 1e6, "sets": sets}


# -- P4 -------------------------------------------------------------------------------------
P4_CHILD = """
import json, time, resource, os
def rss():
    with open('/proc/self/statm') as f:
        return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')
r0 = rss(); t0 = time.perf_counter()
import rtml_ebpf
t1 = time.perf_counter(); r1 = rss()
lim = rtml_ebpf.Limiter(backend='ebpf')
t2 = time.perf_counter(); r2 = rss()
print(json.dumps({'import_s': t1 - t0, 'limiter_s': t2 - t1, 'total_s': t2 - t0, 'rss_bytes': r2 - r0}))
lim.close()
"""


def p4_startup(reps: int) -> dict[str, Any]:
    runs = []
    for _ in range(reps):
        out = subprocess.run([sys.executable, "-c", P4_CHILD], capture_output=True, text=True, check=True)
        runs.append(json.loads(out.stdout))
    return {k: {"median": med([r[k] for r in runs]), "spread": spread([r[k] for r in runs])}
            for k in ("import_s", "limiter_s", "total_s", "rss_bytes")}


# -- P5 -------------------------------------------------------------------------------------
def p5_flood(out_dir: str, duration: float) -> dict[str, Any]:
    out = subprocess.run([sys.executable, "-m", "rtml_ebpf.cli", "demo", "--json", "--duration", str(duration),
                          "--out", out_dir], capture_output=True, text=True, timeout=900)
    if out.returncode != 0:
        raise RuntimeError(f"P5 demo failed: {out.stderr[-2000:]}")
    return dict(json.loads(out.stdout))


# -- P6 -------------------------------------------------------------------------------------
P6_OVERHEAD = """
import json, os, sys, time
from rtml_ebpf import Admission, Limiter
os.environ["RTML_LEDGER_DIR"] = sys.argv[2]
lim = Limiter(backend="ebpf", relief=False, metric="usage", threshold=0.99)
adm = Admission(lim, request_bytes=1 << 20)
n = 20000
for _ in range(2000):
    adm.finish(adm.try_admit("GET /x"))
t0 = time.perf_counter()
for _ in range(n):
    adm.finish(adm.try_admit("GET /x"))
t1 = time.perf_counter()
for _ in range(n):
    lim.is_mem_limit_reached()
t2 = time.perf_counter()
print(json.dumps({"admission_us": (t1 - t0) / n * 1e6, "door_us": (t2 - t1) / n * 1e6}))
"""

def p6_admission(reps: int, tmp: str, duration: float) -> dict[str, Any]:
    """Admission: overhead per request, error of the measured cost, and goodput of the guarded
    pre-fork flood as a share of the ideal concurrency (threshold - idle usage) / cost."""
    from rtml_ebpf._sandbox import ChildCgroup

    over, door, errs = [], [], []
    for _ in range(reps):
        with ChildCgroup(512 * MiB, prefix="rtml-bench") as cg:
            p = cg.popen([sys.executable, "-c", P6_OVERHEAD, "x", tmp], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            out, err = p.communicate(timeout=300)
            if p.returncode != 0:
                raise RuntimeError(f"P6 overhead: {err[-2000:]}")
            r = json.loads(out)
            over.append(r["admission_us"])
            door.append(r["door_us"])
            p = cg.popen([sys.executable, os.path.join(HERE, "workloads.py"), "cost", tmp], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
            out, err = p.communicate(timeout=300)
            if p.returncode != 0:
                raise RuntimeError(f"P6 cost: {err[-2000:]}")
            costs = json.loads(out)
            errs.append(max(abs(m - a) / a for a, m in (*costs["threads"].values(), *costs["async"].values())))
    return {"admission_us": {"median": med(over), "spread": spread(over)},
            "door_us": {"median": med(door), "spread": spread(door)},
            "cost_max_error": {"median": med(errs), "spread": spread(errs)},
            "goodput": p6_goodput(duration)}


def p6_goodput(duration: float) -> dict[str, Any]:
    import http.client
    import statistics as st
    import threading

    from rtml_ebpf.admission.ledger import read_totals
    from rtml_ebpf.demo.flood import Flood, gunicorn_server

    limit, threshold = 256 * MiB, 0.8
    flood = Flood("admission", "admission", gunicorn_server(
        "admission", env={"RTML_THRESHOLD": str(threshold), "RTML_METRIC": "usage"}),
        limit=limit, duration=duration, clients=48)
    inflight: list[int] = []
    idle: list[int] = []
    est: list[int] = []
    start = flood.start_service

    def warm_start(cg: Any) -> None:
        start(cg)
        if idle:
            return
        for _ in range(12):  # each worker loads its programs and learns the route, one at a time
            conn = http.client.HTTPConnection("127.0.0.1", flood.port, timeout=10)
            conn.request("GET", "/work")
            conn.getresponse().read()
            conn.close()
        time.sleep(1.0)
        idle.append(cg.usage())
        flood.cgdir = cg.directory  # type: ignore[attr-defined]

    def sample() -> None:
        while not flood.stop.is_set() and not hasattr(flood, "cgdir"):
            time.sleep(0.05)
        while not flood.stop.is_set():
            # the service runs as root with this environment: its ledger is where ours would be
            totals = read_totals(os.stat(flood.cgdir).st_ino)  # type: ignore[attr-defined]
            if totals is None:
                time.sleep(0.02)
                continue
            inflight.append(totals.inflight)
            time.sleep(0.02)
        try:
            conn = http.client.HTTPConnection("127.0.0.1", flood.port, timeout=5)
            conn.request("GET", "/rtml-stats")
            routes = json.loads(conn.getresponse().read()).get("routes", [])
            est.extend(r["estimate"] for r in routes if r.get("estimate"))
        except (OSError, ValueError):
            pass

    flood.start_service = warm_start  # type: ignore[method-assign]
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    r = flood.run()
    sampler.join(timeout=10)
    cost = est[0] if est else 24 * MiB
    ideal = (threshold * limit - idle[0]) / cost if idle else 0.0
    mean_inflight = st.fmean(inflight) if inflight else 0.0
    return {"oom_kills": r.oom_kills, "served": r.served, "rejected": r.rejected, "failed": r.failed,
            "peak_bytes": r.peak_bytes, "idle_bytes": idle[0] if idle else None, "cost_bytes": cost,
            "ideal_concurrency": ideal, "mean_inflight": mean_inflight,
            "share": mean_inflight / ideal if ideal else 0.0}


# -- P7 -------------------------------------------------------------------------------------
def p7_service_overhead(reps: int) -> dict[str, Any]:
    """The overhead a real service sees: requests/s of the unguarded demo service (threaded
    http.server) on an allocating request (24 MiB in 1 MiB chunks) and a JSON request (parse
    5 MB), with no program attached and with each hook set watching its cgroup, interleaved."""
    import http.client

    import rtml_ebpf
    from rtml_ebpf._sandbox import ChildCgroup
    from rtml_ebpf.demo.flood import free_port, wait_listening

    def rate(port: int, path: str, n: int) -> float:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        t0 = time.perf_counter()
        for _ in range(n):
            conn.request("GET", path)
            conn.getresponse().read()
            conn.close()
        return n / (time.perf_counter() - t0)

    results: dict[str, dict[str, list[float]]] = {}
    env_before = os.environ.get("RTML_HOOKS")
    try:
        with ChildCgroup(1024 * MiB, prefix="rtml-bench") as cg:
            port = free_port()
            p = cg.popen([sys.executable, "-m", "rtml_ebpf.demo.service", "--guard", "none", "--hold", "0",
                          "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            wait_listening(port, p)
            for path, n in (("/work", 60), ("/json", 20)):
                rate(port, path, n // 2)  # warm-up
                for _ in range(reps):
                    results.setdefault(path, {}).setdefault("none", []).append(rate(port, path, n))
                    for hook_set, env in HOOK_SETS.items():
                        os.environ["RTML_HOOKS"] = env
                        with rtml_ebpf.Limiter(cg.directory, backend="ebpf", relief=False):
                            results[path].setdefault(hook_set, []).append(rate(port, path, n))
    finally:
        if env_before is None:
            os.environ.pop("RTML_HOOKS", None)
        else:
            os.environ["RTML_HOOKS"] = env_before
    out: dict[str, Any] = {}
    for path, by in results.items():
        base = by["none"]
        out[path] = {"base_rps": med(base)}
        for hook_set in HOOK_SETS:
            slow = [(b / w - 1) * 100 for b, w in zip(base, by[hook_set], strict=True)]
            out[path][hook_set] = {"overhead_pct": med(slow), "spread_pct": spread(slow)}
    return out


# -- P8 -------------------------------------------------------------------------------------
P8_READER = """
import os, sys, time
f = open(sys.argv[1], "rb")
while f.read(1 << 20):
    pass
buf = bytearray(40 << 20)
buf[::4096] = b"x" * (len(buf) // 4096)
print("ready", flush=True)
time.sleep(120)
"""


def p8_precision(reps: int, tmp: str) -> dict[str, Any]:
    """Per hook set: how long the verdict takes to clear after the cgroup frees its memory, and
    the working-set error at rest (stats() against usage - inactive_file from the files)."""
    import rtml_ebpf
    from rtml_ebpf import _cgroup
    from rtml_ebpf._sandbox import ChildCgroup

    data = os.path.join(tmp, "p8-cache.bin")
    with open(data, "wb") as f:
        for _ in range(96):
            f.write(os.urandom(MiB))
    clear: dict[str, list[float]] = {h: [] for h in HOOK_SETS}
    ws_err: dict[str, list[float]] = {h: [] for h in HOOK_SETS}
    env_before = os.environ.get("RTML_HOOKS")
    try:
        for _ in range(reps):
            for hook_set, env in HOOK_SETS.items():
                os.environ["RTML_HOOKS"] = env
                with ChildCgroup(512 * MiB, prefix="rtml-bench") as cg:
                    hold = cg.popen([sys.executable, os.path.join(HERE, "workloads.py"), "hold"],
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                    bufsize=1)
                    assert hold.stdin is not None and hold.stdout is not None
                    hold.stdout.readline()
                    with rtml_ebpf.Limiter(cg.directory, backend="ebpf", threshold=64 * MiB, metric="usage",
                                           relief=False) as lim:
                        hold.stdin.write("100\n")
                        hold.stdin.flush()
                        hold.stdout.readline()
                        deadline = time.monotonic() + 5
                        while not lim.is_mem_limit_reached() and time.monotonic() < deadline:
                            time.sleep(0.001)
                        hold.stdin.write("-100\n")
                        hold.stdin.flush()
                        hold.stdout.readline()
                        t0 = time.monotonic()
                        while lim.is_mem_limit_reached() and time.monotonic() - t0 < 5:
                            time.sleep(0.001)
                        clear[hook_set].append(time.monotonic() - t0)
                    hold.kill()
                    hold.wait()
                with open(data, "rb") as f:
                    os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
                with ChildCgroup(512 * MiB, prefix="rtml-bench") as cg:
                    with rtml_ebpf.Limiter(cg.directory, backend="ebpf", relief=False) as lim:
                        reader = cg.popen([sys.executable, "-c", P8_READER, data], stdout=subprocess.PIPE,
                                          stderr=subprocess.DEVNULL)
                        assert reader.stdout is not None
                        reader.stdout.readline()
                        time.sleep(1.0)  # at rest
                        s = lim.stats()
                        mc = _cgroup.cgroup_from_directory(cg.directory)
                        truth = mc.read_usage() - mc.read_inactive_file()
                        ws_err[hook_set].append(abs(s.working_set_bytes - truth) / MiB)
                        reader.kill()
                        reader.wait()
    finally:
        os.unlink(data)
        if env_before is None:
            os.environ.pop("RTML_HOOKS", None)
        else:
            os.environ["RTML_HOOKS"] = env_before
    return {h: {"clear_ms": {"median": med(clear[h]) * 1e3, "spread": spread([x * 1e3 for x in clear[h]])},
                "ws_error_mib": {"median": med(ws_err[h]), "spread": spread(ws_err[h])}} for h in HOOK_SETS}


# -- report ---------------------------------------------------------------------------------
def verdict(ok: bool) -> str:
    return "**met**" if ok else "**missed**"


def write_plots(res: dict[str, Any], out_dir: str) -> list[str]:
    """P1 and P2 as bar charts (log scale: the figures span four orders of magnitude)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    if "P1" in res:
        rows = res["P1"]["rows"]
        names = list(rows)
        fig, ax = plt.subplots(figsize=(9, 4))
        ax.barh(names, [rows[n]["median_ns"] for n in names],
                color=["tab:gray" if "empty" in n else "tab:green" if "ebpf" in n else "tab:orange" for n in names])
        ax.set_xscale("log")
        ax.set_xlabel("ns per call (median, log scale)")
        ax.set_title("P1: cost of one memory check")
        ax.invert_yaxis()
        fig.tight_layout()
        path = os.path.join(out_dir, "p1_check_cost.png")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    if "P2" in res:
        rows = res["P2"]["rows"]
        cap = res["P2"]["max_mib"] - res["P2"]["threshold"] // MiB
        names = list(rows)
        values = [rows[n]["median_mib"] if not rows[n]["not_flipped"] else cap for n in names]
        fig, ax = plt.subplots(figsize=(8, 3.5))
        bars = ax.bar(names, [max(v, 0.01) for v in values],
                      color=["tab:green" if n == "ebpf" else "tab:orange" for n in names])
        for bar, n in zip(bars, names, strict=True):
            if rows[n]["not_flipped"]:
                ax.annotate(f"> {cap} MiB in {rows[n]['not_flipped']} runs", (bar.get_x(), bar.get_height()),
                            fontsize=8, xytext=(0, 3), textcoords="offset points")
        ax.set_yscale("log")
        ax.set_ylabel("MiB past the threshold (median)")
        ax.set_title("P2: overshoot before the check flips")
        fig.tight_layout()
        path = os.path.join(out_dir, "p2_overshoot.png")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


def write_report(res: dict[str, Any], out_dir: str) -> str:
    m = res["machine"]
    lines = ["# rtml-ebpf benchmark report", "",
             f"Machine: Linux {m['kernel']}, {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, "
             f"Python {m['python']}; {m['date']}. A shared VM: figures are medians of interleaved repeats "
             "with their spread (min–max).", "",
             "Reproduce: `make bench` (as root).", ""]
    if res.get("sections_from"):  # a report merged from runs of some sections (see --merge)
        lines += ["Sections from separate runs on this machine: " + "; ".join(
            f"{k}: {v}" for k, v in res["sections_from"].items()) + ".", ""]
    if "P1" in res:
        p = res["P1"]
        lines += ["## P1 check cost", "", "| check | ns per call (median) | spread |", "|---|---|---|"]
        lines += [f"| {k} | {v['median_ns']:.1f} | {v['spread_ns']} |" for k, v in p["rows"].items()]
        lines += ["", f"- direct file read / ebpf check: **{p['file_read_over_ebpf']:.0f}x** (target ≥ 100x: "
                  f"{verdict(p['file_read_over_ebpf'] >= 100)})",
                  f"- ebpf check / empty method call: **{p['ebpf_over_empty']:.2f}x** (target ≤ 1.6x: "
                  f"{verdict(p['ebpf_over_empty'] <= 1.6)})",
                  f"- psutil RSS / ebpf check: {p['psutil_over_ebpf']:.0f}x; uncached poll / ebpf: "
                  f"{p['poll_nocache_over_ebpf']:.0f}x", "", "![P1](p1_check_cost.png)", ""]
    if "P2" in res:
        p = res["P2"]
        lines += ["## P2 overshoot", "",
                  f"A process in a {p['limit'] // MiB} MiB cgroup allocates and touches memory in 1 MiB steps as "
                  f"fast as it can, checking after each step; threshold {p['threshold'] // MiB} MiB (usage). "
                  f"Overshoot = kernel usage at the flip minus the threshold. A run that had not flipped after "
                  f"{p['max_mib']} MiB counts as 'not flipped' (overshoot > {p['max_mib'] - p['threshold'] // MiB}"
                  " MiB).", "",
                  "| check | overshoot MiB (median) | spread | not flipped | alloc rate MiB/s |",
                  "|---|---|---|---|---|"]
        for k, v in p["rows"].items():
            med_s = f"{v['median_mib']:.2f}" if v["median_mib"] is not None else "-"
            lines.append(f"| {k} | {med_s} | {v['spread_mib']} | {v['not_flipped']} | {v['rate_mib_s']:.0f} |")
        e = p["rows"]["ebpf"]["median_mib"]
        lines += ["", f"- ebpf overshoot target ≤ 1 MiB: {verdict(e is not None and e <= 1)}", "",
                  "![P2](p2_overshoot.png)", ""]
    if "P3" in res:
        p = res["P3"]
        lines += ["## P3 probe overhead, per hook set", "",
                  f"A C fault storm (mmap 64 MiB, touch every page, munmap; {p['pages_per_run']} faults per run), "
                  f"{p['fault_us_base']:.2f} µs per fault without BPF. For each hook set: the storm with the set's "
                  "empty programs (the floor: what the kernel charges to run any program there), and with rtml "
                  "watching the storm's cgroup and another one; all interleaved.", "",
                  "| hook set | hooks | storm overhead | floor (empty programs) | storm in an unwatched cgroup |"
                  " target |", "|---|---|---|---|---|---|"]
        for name, v in p["sets"].items():
            target = "≤ 5%" if name == "lean" else "-"
            ok = f" {verdict(v['overhead_pct'] <= 5)}" if name == "lean" else ""
            lines.append(f"| {name} | {', '.join(v['hooks'])} | **{v['overhead_pct']:.1f}%** "
                         f"({v['overhead_spread_pct']}) | {v['floor_overhead_pct']:.1f}% ({v['floor_spread_pct']}) | "
                         f"{v['unwatched_overhead_pct']:.1f}% ({v['unwatched_spread_pct']}) | {target}{ok} |")
        lines += ["", "| hook set | program | ns per run (median) | spread | runs per fault |", "|---|---|---|---|---|"]
        for name, v in p["sets"].items():
            for k, e in v["per_event"].items():
                if "events per fault" in k:
                    continue
                per = v["per_event"].get(k + " events per fault", {"median": 0.0})["median"]
                lines.append(f"| {name} | {k} | {e['median']:.0f} | {e['spread']} | {per:.2f} |")
        lines += ["", "Per-event run time target ≤ 100 ns (measured with kernel.bpf_stats_enabled, whose two "
                  "clock reads are included). Programs that ran a handful of times have noisy figures.", ""]
    if "P4" in res:
        p = res["P4"]
        lines += ["## P4 start-up", "", "| step | median | spread |", "|---|---|---|",
                  f"| import rtml_ebpf | {p['import_s']['median'] * 1e3:.1f} ms | {p['import_s']['spread']} s |",
                  f"| first ebpf Limiter (load, verify, attach) | {p['limiter_s']['median'] * 1e3:.1f} ms | "
                  f"{p['limiter_s']['spread']} s |",
                  f"| RSS added | {p['rss_bytes']['median'] / MiB:.1f} MiB | {p['rss_bytes']['spread']} B |", "",
                  f"- total {p['total_s']['median'] * 1e3:.0f} ms, target ≤ 150 ms: "
                  f"{verdict(p['total_s']['median'] <= 0.150)}; RSS target ≤ 10 MiB: "
                  f"{verdict(p['rss_bytes']['median'] <= 10 * MiB)}", ""]
    if "P5" in res:
        p = res["P5"]
        lines += ["## P5 flood survival", "",
                  f"`rtml-ebpf demo`: limit {p['limit_bytes'] // MiB} MiB, threshold {p['threshold']}, "
                  f"{p['clients']} clients, {p['payload_mib']} MiB per request, {p['duration_s']:.0f} s per run.", "",
                  "| run | OOM kills | served | rejected | failed | peak MiB | first OOM kill |",
                  "|---|---|---|---|---|---|---|"]
        for r in p["runs"]:
            first = f"{r['time_to_first_oom_s']:.1f} s" if r["time_to_first_oom_s"] is not None else "-"
            lines.append(f"| {r['name']} | {r['oom_kills']} | {r['served']} | {r['rejected']} | {r['failed']} | "
                         f"{r['peak_bytes'] / MiB:.0f} | {first} |")
        guarded = [r for r in p["runs"] if r["guard"] in ("ebpf", "admission")]
        lines += ["", f"- zero OOM kills for the kernel-fed guards (in-handler check, pre-fork admission): "
                  f"{verdict(all(r['oom_kills'] == 0 for r in guarded))}", "", "![flood](flood.png)", ""]
    if "P6" in res:
        p = res["P6"]
        g = p["goodput"]
        lines += ["## P6 admission", "",
                  f"- overhead per admitted request (try_admit + finish, shared ledger, kernel-fed meter): "
                  f"**{p['admission_us']['median']:.1f} µs** (spread {p['admission_us']['spread']}), against "
                  f"{p['door_us']['median']:.2f} µs for the check at the door alone; target ≤ 2 µs: "
                  f"{verdict(p['admission_us']['median'] <= 2)}",
                  f"- error of the measured per-request cost against what the request allocated (threads and "
                  f"asyncio requests, 2–64 MiB): worst **{p['cost_max_error']['median'] * 100:.1f}%** "
                  f"(spread {p['cost_max_error']['spread']}); target ≤ 10%: "
                  f"{verdict(p['cost_max_error']['median'] <= 0.10)}",
                  f"- goodput of the guarded pre-fork flood (gunicorn --preload, 4 gthread workers x 8, 256 MiB, "
                  f"threshold 0.8, 48 clients): mean requests in flight **{g['mean_inflight']:.2f}** against the "
                  f"ideal (threshold - idle usage {g['idle_bytes'] / MiB if g['idle_bytes'] else 0:.0f} MiB) / "
                  f"cost {g['cost_bytes'] / MiB:.1f} MiB = {g['ideal_concurrency']:.2f}: **{g['share'] * 100:.0f}%**;"
                  f" target ≥ 80%: {verdict(g['share'] >= 0.8)}. {g['oom_kills']} OOM kills, {g['served']} served, "
                  f"{g['rejected']} rejected, {g['failed']} failed, peak {g['peak_bytes'] / MiB:.0f} MiB.", ""]
    if "P7" in res:
        p = res["P7"]
        lines += ["## P7 overhead a real service sees", "",
                  "The unguarded demo service (threaded http.server), requests/s with no program attached and "
                  "with each hook set watching its cgroup, interleaved.", "",
                  "| request | requests/s without | memcg set | lean set | target (lean) |", "|---|---|---|---|---|"]
        names = {"/work": "allocate 24 MiB in 1 MiB chunks", "/json": "parse a 5 MB JSON document"}
        for path, v in p.items():
            lean = v["lean"]["overhead_pct"]
            lines.append(f"| {names.get(path, path)} | {v['base_rps']:.1f} | {v['memcg']['overhead_pct']:.1f}% "
                         f"({v['memcg']['spread_pct']}) | {lean:.1f}% ({v['lean']['spread_pct']}) | ≤ 5%: "
                         f"{verdict(lean <= 5)} |")
        lines.append("")
    if "P8" in res:
        p = res["P8"]
        lines += ["## P8 precision per hook set", "",
                  "Time for the verdict to clear after the cgroup frees 100 MiB (threshold 64 MiB), and the "
                  "working-set error at rest with 96 MiB of file cache and 40 MiB of anon memory in the cgroup "
                  "(stats() against usage - inactive_file read from the files at the same moment).", "",
                  "| hook set | time to clear after a free (ms) | working-set error (MiB) |", "|---|---|---|"]
        for name, v in p.items():
            lines.append(f"| {name} | {v['clear_ms']['median']:.0f} ({v['clear_ms']['spread']}) | "
                         f"{v['ws_error_mib']['median']:.2f} ({v['ws_error_mib']['spread']}) |")
        lines.append("")
    if "P9" in res:
        from benchmarks.agent_scale import report_lines

        lines += report_lines(res["P9"])
    if "P10" in res:
        from benchmarks.node_view import report_lines as p10_lines

        lines += p10_lines(res["P10"])
    if "P11" in res:
        from benchmarks.node_cost import report_lines as p11_lines

        lines += p11_lines(res["P11"])
    if "P12" in res:
        from benchmarks.requests_bench import p12_lines

        lines += p12_lines(res["P12"])
    path = os.path.join(out_dir, "report.md")
    with open(path, "w") as f:
        f.write("\n".join(lines))
    return path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--quick", action="store_true", help="fewer repeats (a smoke run)")
    ap.add_argument("--only", default="P1,P2,P3,P4,P5,P6,P7,P8,P9,P10,P11,P12")
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    ap.add_argument("--merge", action="store_true",
                    help="keep the sections of --out/results.json that this run does not measure (say which run "
                         "each comes from in the report)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("benchmarks: run as root (they load BPF programs and create memory cgroups)", file=sys.stderr)
        return 4
    os.makedirs(args.out, exist_ok=True)
    only = {s.strip().upper() for s in args.only.split(",")}
    reps = 3 if args.quick else 7
    res: dict[str, Any] = {"machine": machine()}
    steps: list[tuple[str, Callable[[], dict[str, Any]]]] = [
        ("P1", lambda: p1_check_cost(reps, 200_000 if args.quick else 1_000_000)),
        ("P2", lambda: p2_overshoot(2 if args.quick else 5)),
        ("P3", lambda: p3_probe_overhead(reps, args.out)),
        ("P4", lambda: p4_startup(reps)),
        ("P5", lambda: p5_flood(args.out, 6 if args.quick else 12)),
        ("P6", lambda: p6_admission(2 if args.quick else 5, args.out, 8 if args.quick else 20)),
        ("P7", lambda: p7_service_overhead(3 if args.quick else 7)),
        ("P8", lambda: p8_precision(2 if args.quick else 5, args.out)),
        ("P9", lambda: p9_agent_scale(2 if args.quick else 3, compile_storm(args.out))),
        ("P10", lambda: p10_node_view(5 if args.quick else 20, 10 if args.quick else 30)),
        ("P11", lambda: p11_node_cost(2 if args.quick else 5, compile_storm(args.out))),
        ("P12", lambda: p12_requests(10 if args.quick else 40, 8 if args.quick else 20)),
    ]
    for name, fn in steps:
        if name in only:
            print(f"benchmarks: {name} ...", file=sys.stderr, flush=True)
            t = time.monotonic()
            res[name] = fn()
            print(f"benchmarks: {name} done in {time.monotonic() - t:.0f} s", file=sys.stderr, flush=True)
    path_json = os.path.join(args.out, "results.json")
    if args.merge and os.path.exists(path_json):
        with open(path_json) as f:
            old = json.load(f)
        ran = sorted(k for k in res if k.startswith("P"))
        kept = sorted(k for k in old if k.startswith("P") and k not in res)
        sources = {**old.get("sections_from", {k: old["machine"]["date"] for k in kept})}
        sources = {k: v for k, v in sources.items() if k in kept}
        sources.update({k: res["machine"]["date"] for k in ran})
        res = {**{k: old[k] for k in kept}, **res, "sections_from": dict(sorted(sources.items()))}
    with open(path_json, "w") as f:
        json.dump(res, f, indent=2)
    write_plots(res, args.out)
    path = write_report(res, args.out)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
