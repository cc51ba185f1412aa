"""P9, the node agent at scale: one agent watching 1 and then 1,000 limited cgroups.

Figures: agent RSS, register latency (connect, watch, reply with the page), the agent's idle
CPU (its rescans), and the fault storm's overhead and per-event program run time with 1 and
with 1,000 watched cgroups, against the storm with no program, all in the same run.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

from benchmarks.common import spread
from benchmarks.faultstorm import PAGES, bpf_run_stats, bpf_stats_setting, set_bpf_stats, storm_seconds

MiB = 1 << 20
REGISTER_CHILD = """
import json, socket, sys, time
path, n = sys.argv[1], int(sys.argv[2])
msg = json.dumps({"v": 1, "op": "watch", "rules": [{"metric": "usage", "trip_ppm": 900000,
                  "clear_ppm": 880000}]}).encode()
times = []
for _ in range(n):
    t0 = time.perf_counter()
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.connect(path)
    s.send(msg)
    data, anc, _, _ = s.recvmsg(4096, socket.CMSG_SPACE(8))
    t1 = time.perf_counter()
    assert json.loads(data)["ok"], data
    for _, _, payload in anc:
        import os
        for i in range(0, len(payload), 4):
            os.close(int.from_bytes(payload[i:i + 4], "little"))
    s.close()
    times.append((t1 - t0) * 1e3)
times.sort()
print(json.dumps({"median_ms": times[len(times) // 2], "p99_ms": times[int(len(times) * 0.99) - 1]}))
"""


CHECK_CHILD = """
import json, sys, timeit
from rtml_ebpf import Limiter
class Empty:
    def method(self):
        return False
empty = Empty()
lim = Limiter(backend="agent", relief=False)
assert lim.backend == "agent", lim.stats().backend_reason
env = {"empty": empty, "lim": lim}
n, reps = int(sys.argv[1]), int(sys.argv[2])
rows = {"empty method call": [], "agent check (uid 65534)": []}
for _ in range(reps):
    rows["empty method call"].append(timeit.timeit("empty.method()", number=n, globals=env) / n * 1e9)
    rows["agent check (uid 65534)"].append(timeit.timeit("lim.is_mem_limit_reached()", number=n, globals=env) / n * 1e9)
print(json.dumps(rows))
"""
NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all"]


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def _agent_prog_ids(agent: AgentProcess) -> dict[str, int]:
    """The agent's attached programs, from its start-up log line (hook=id)."""
    import re

    agent.log.flush()
    with open(agent.log.name) as f:
        text = f.read()
    ids = re.findall(r"program ids: ([\w=,]+)", text)
    return {k: int(v) for k, v in (pair.split("=") for pair in ids[-1].split(","))} if ids else {}


class AgentProcess:
    def __init__(self, glob: str, hooks: str, tmp: str) -> None:
        self.socket = os.path.join(tmp, "agent.sock")
        self.log = open(os.path.join(tmp, "agent.log"), "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "rtml_ebpf.cli", "agent", "--socket", self.socket,
                                      "--no-pin", "--watch", glob, "--hooks", hooks, "--metrics-addr",
                                      "127.0.0.1:0"],
                                     stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while not os.path.exists(self.socket):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"P9: the agent did not start ({self.proc.returncode})")
            time.sleep(0.05)

    def watched(self) -> int:
        self.log.flush()
        with open(self.log.name) as f:
            text = f.read()
        return text.count("rtml-ebpf agent: watching ") - text.count("rtml-ebpf agent: unwatched ")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=30)
        if not self.log.closed:
            self.log.close()
        if os.path.exists(self.socket):
            os.unlink(self.socket)


def p9_agent_scale(reps: int, storm: str, cgroups: int = 1000,
                   hook_sets: tuple[str, ...] = ("auto", "lean")) -> dict[str, Any]:
    from benchmarks.cgroups import ChildCgroup, children_glob

    run_storm = functools.partial(storm_seconds, storm)
    stats_before = bpf_stats_setting()
    res: dict[str, Any] = {"cgroups": cgroups, "pages_per_run": PAGES, "sets": {}}
    tmp = tempfile.mkdtemp(prefix="rtml-bench-agent-")
    os.chmod(tmp, 0o755)  # uid 65534 connects to the socket in it
    try:
        with ChildCgroup(None, prefix="rtml-bench-agents") as parent:
            glob = children_glob(parent.directory)
            with ChildCgroup(512 * MiB, prefix="storm", parent=parent.directory) as cg:
                run_storm(cg)  # warm-up
                for hooks in hook_sets:
                    rows: dict[str, list[float]] = {k: [] for k in (
                        "base", "base_many", "one", "many", "rss_one_kib", "rss_many_kib", "register_median_ms",
                        "register_p99_ms", "idle_cpu_pct", "watch_all_s", "scrape_100_ms", "scrape_1000_ms")}
                    per_event: dict[str, dict[str, list[float]]] = {"one": {}, "many": {}}
                    check: dict[str, list[float]] = {}
                    for _ in range(reps):
                        _one_rep(rows, per_event, check, cg, parent, glob, hooks, tmp, cgroups, run_storm)
                        if not check:
                            raise RuntimeError("P9: no check-cost figures")
                    res["sets"][hooks] = _summarize(rows, per_event)
                    res["sets"][hooks]["check_ns"] = {k: {"median": statistics.median(v), "spread": spread(v)}
                                                      for k, v in check.items()}
                    ratios = [a / e for a, e in zip(check["agent check (uid 65534)"], check["empty method call"],
                                                    strict=True)]
                    res["sets"][hooks]["check_over_empty"] = {"median": statistics.median(ratios),
                                                              "spread": spread(ratios)}
    finally:
        set_bpf_stats(stats_before)
    return res


def _one_rep(rows: dict[str, list[float]], per_event: dict[str, dict[str, list[float]]],
             check: dict[str, list[float]], cg: Any, parent: Any, glob: str, hooks: str, tmp: str, cgroups: int,
             run_storm: Any) -> None:
    """One repeat: the storm with no program, then under the agent with 1 cgroup watched, then
    with all watched, then with the same cgroups present and no agent (the baseline of the
    second figure: a thousand memcgs cost the kernel something of their own)."""
    from benchmarks.cgroups import ChildCgroup

    set_bpf_stats("0")
    rows["base"].append(run_storm(cg))
    extra: list[ChildCgroup] = []
    agent = AgentProcess(glob, hooks, tmp)
    try:
        deadline = time.monotonic() + 10
        while agent.watched() < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        rows["rss_one_kib"].append(_rss_kib(agent.proc.pid))
        rows["one"].append(run_storm(cg))
        if not check:
            check.update(_check_cost(cg, agent.socket))
        ids = _agent_prog_ids(agent)
        _per_event(per_event["one"], ids, run_storm, cg)
        extra = [ChildCgroup(64 * MiB, prefix="c", parent=parent.directory) for _ in range(99)]
        deadline = time.monotonic() + 60
        while agent.watched() < 100 and time.monotonic() < deadline:
            time.sleep(0.05)
        rows["scrape_100_ms"].append(_scrape_ms(agent))
        extra += [ChildCgroup(64 * MiB, prefix="c", parent=parent.directory) for _ in range(cgroups - 100)]
        t0 = time.monotonic()
        while agent.watched() < cgroups and time.monotonic() - t0 < 60:
            time.sleep(0.05)
        rows["watch_all_s"].append(time.monotonic() - t0)
        rows["scrape_1000_ms"].append(_scrape_ms(agent))
        time.sleep(1.0)
        rows["rss_many_kib"].append(_rss_kib(agent.proc.pid))
        cpu0, w0 = _cpu_seconds(agent.proc.pid), time.monotonic()
        time.sleep(5.0)
        rows["idle_cpu_pct"].append((_cpu_seconds(agent.proc.pid) - cpu0) / (time.monotonic() - w0) * 100)
        rows["many"].append(run_storm(cg))
        _per_event(per_event["many"], ids, run_storm, cg)
        p = cg.popen([sys.executable, "-c", REGISTER_CHILD, agent.socket, "300"], stdout=subprocess.PIPE,
                     stderr=subprocess.PIPE)
        out, err = p.communicate(timeout=120)
        if p.returncode != 0:
            raise RuntimeError(f"P9 register: {err[-2000:]}")
        lat = json.loads(out)
        rows["register_median_ms"].append(lat["median_ms"])
        rows["register_p99_ms"].append(lat["p99_ms"])
        agent.stop()
        rows["base_many"].append(run_storm(cg))
    finally:
        agent.stop()
        for c in extra:
            c.close()


def _scrape_ms(agent: AgentProcess, n: int = 5) -> float:
    """Median time of a full GET /metrics (render and transfer), in ms."""
    import re
    import urllib.request

    agent.log.flush()
    with open(agent.log.name) as f:
        url = re.findall(r"metrics at (http://\S+/metrics)", f.read())[-1]
    times = []
    for _ in range(n):
        t = time.perf_counter()
        with urllib.request.urlopen(url, timeout=10) as r:
            r.read()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def _check_cost(cg: Any, socket_path: str) -> dict[str, list[float]]:
    """The hot path as an unprivileged client reads it: one byte of the agent's page."""
    import site

    python = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {"PYTHONPATH": ":".join([root, *site.getsitepackages()]), "HOME": "/tmp", "RTML_AGENT_SOCKET": socket_path,
           "PATH": "/usr/bin:/bin"}
    p = cg.popen([*NOBODY, python, "-c", CHECK_CHILD, "1000000", "7"], env=env, stdout=subprocess.PIPE,
                 stderr=subprocess.PIPE)
    out, err = p.communicate(timeout=300)
    if p.returncode != 0:
        raise RuntimeError(f"P9 check cost: {err[-2000:]}")
    return dict(json.loads(out))


def _per_event(into: dict[str, list[float]], ids: dict[str, int], run_storm: Any, cg: Any) -> None:
    set_bpf_stats("1")
    before = bpf_run_stats(ids)
    run_storm(cg)
    after = bpf_run_stats(ids)
    set_bpf_stats("0")
    for name in ids:
        dt, dn = after[name][0] - before[name][0], after[name][1] - before[name][1]
        if dn:
            into.setdefault(name, []).append(dt / dn)
            into.setdefault(name + " events per fault", []).append(dn / PAGES)


def _summarize(rows: dict[str, list[float]], per_event: dict[str, dict[str, list[float]]]) -> dict[str, Any]:
    import statistics

    def med(xs: list[float]) -> float:
        return statistics.median(xs) if xs else float("nan")

    def pct(xs: list[float], base: list[float]) -> tuple[float, str]:
        ratios = [(x / b - 1) * 100 for x, b in zip(xs, base, strict=True)]
        return med(ratios), spread(ratios)

    one, one_spread = pct(rows["one"], rows["base"])
    many, many_spread = pct(rows["many"], rows["base_many"])
    out: dict[str, Any] = {
        "overhead_one_pct": one, "overhead_one_spread_pct": one_spread,
        "overhead_many_pct": many, "overhead_many_spread_pct": many_spread,
        "per_event": {k: {n: {"median": med(v), "spread": spread(v)} for n, v in d.items()}
                      for k, d in per_event.items()},
    }
    for k in ("rss_one_kib", "rss_many_kib", "register_median_ms", "register_p99_ms", "idle_cpu_pct",
              "watch_all_s", "scrape_100_ms", "scrape_1000_ms"):
        out[k] = {"median": med(rows[k]), "spread": spread(rows[k])}
    return out


def report_lines(p: dict[str, Any]) -> list[str]:
    """The P9 section of benchmarks/results/report.md."""
    def verdict(ok: bool) -> str:
        return "met" if ok else "**missed**"

    lines = ["## P9 the node agent at scale", "",
             f"One `rtml-ebpf agent` (--no-pin) watching 1, then {p['cgroups']} limited cgroups (`--watch`); the "
             "fault storm runs in one of them. Storm overhead against the storm with no program in the same run "
             "(for 1,000: the storm with the same 1,000 cgroups present and no agent). Register: connect, watch, "
             "reply with the page's fd (300 in a row from a process in a watched cgroup). Idle CPU: the agent over "
             "5 s with "
             "everything watched (inotify: no polling walk). Check: `Limiter(backend=\"agent\")` as uid 65534 "
             "with no capabilities, against an empty method call in the same process.", "",
             "| figure | hook set | 1 cgroup | 1,000 cgroups | target |", "|---|---|---|---|---|"]
    for hooks, v in p["sets"].items():
        name = "memcg (default)" if hooks == "auto" else hooks
        lines.append(f"| fault-storm overhead | {name} | {v['overhead_one_pct']:.1f}% ({v['overhead_one_spread_pct']}) "
                     f"| {v['overhead_many_pct']:.1f}% ({v['overhead_many_spread_pct']}) | no worse with 1,000 |")
        for prog in sorted({k for d in v["per_event"].values() for k in d if "per fault" not in k}):
            one = v["per_event"].get("one", {}).get(prog)
            many = v["per_event"].get("many", {}).get(prog)
            if one and many:
                rate = v["per_event"]["many"].get(prog + " events per fault", {}).get("median", 0)
                lines.append(f"| per-event run time, {prog} ({rate:.3g} per fault) | {name} | {one['median']:.0f} ns "
                             f"({one['spread']}) | {many['median']:.0f} ns ({many['spread']}) | ≤ 100 ns: "
                             f"{verdict(many['median'] <= 100)} |")
        lines.append(f"| agent RSS | {name} | {v['rss_one_kib']['median'] / 1024:.1f} MiB | "
                     f"{v['rss_many_kib']['median'] / 1024:.1f} MiB | ≤ 50 MiB: "
                     f"{verdict(v['rss_many_kib']['median'] <= 50 * 1024)} |")
        lines.append(f"| register latency, median / p99 | {name} | | {v['register_median_ms']['median']:.2f} / "
                     f"{v['register_p99_ms']['median']:.2f} ms | ≤ 5 ms: "
                     f"{verdict(v['register_p99_ms']['median'] <= 5)} |")
        lines.append(f"| agent idle CPU | {name} | | {v['idle_cpu_pct']['median']:.2f}% of a core | |")
        if "scrape_1000_ms" in v:
            lines.append(f"| GET /metrics, 100 / 1,000 cgroups | {name} | "
                         f"{v['scrape_100_ms']['median']:.1f} ms (100) | {v['scrape_1000_ms']['median']:.1f} ms | "
                         f"≤ 100 ms: {verdict(v['scrape_1000_ms']['median'] <= 100)} |")
        lines.append(f"| time to watch {p['cgroups'] - 1} new cgroups | {name} | | "
                     f"{v['watch_all_s']['median']:.1f} s | |")
        c = v.get("check_over_empty")
        if c:
            lines.append(f"| agent check / empty method call (uid 65534) | {name} | {c['median']:.2f}x ({c['spread']}) "
                         f"| | ≤ 1.6x: {verdict(c['median'] <= 1.6)} |")
    lines.append("")
    return lines
