"""``rtml-ebpf demo``: flood a real service in a real memory cgroup, three times.

Runs: unguarded; guarded by a 1 s poll of the cgroup usage (OpenTelemetry
memory_limiter style); guarded by ``is_mem_limit_reached()`` on the eBPF
backend. Each run gets a fresh child cgroup with the same limit, the same
service code and the same load from a generator outside the cgroup. A service
that is OOM-killed is restarted, as a supervisor or kubelet would.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from .. import config
from .._sandbox import ChildCgroup
from ..errors import ConfigError, NotSupported

MiB = 1 << 20
GUARDS = (("unguarded", "none"), ("poll 1s", "poll"), ("rtml-ebpf", "ebpf"))


@dataclass
class RunResult:
    name: str
    guard: str
    oom_kills: int = 0
    served: int = 0
    rejected: int = 0
    failed: int = 0
    restarts: int = 0
    peak_bytes: int = 0
    time_to_first_oom_s: float | None = None
    samples: list[tuple[float, int]] = field(default_factory=list)  # (seconds, usage bytes)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--limit", default="256Mi", help="memory limit of the service's cgroup (default 256Mi)")
    p.add_argument("--threshold", type=float, default=0.8, help="guard threshold, fraction of the limit")
    p.add_argument("--duration", type=float, default=20.0, help="seconds of flood per run (default 20)")
    p.add_argument("--clients", type=int, default=24, help="concurrent clients (default 24)")
    p.add_argument("--payload-mib", type=int, default=24, help="MiB each request builds and holds")
    p.add_argument("--hold", type=float, default=0.3, help="seconds each request holds its payload")
    p.add_argument("--out", default="demo-results", help="directory for flood.png and flood.json")
    p.add_argument("--json", action="store_true", help="print the results as JSON (no live display)")


def parse_size(text: str) -> int:
    return config.parse_size(text, name="--limit")


def preflight() -> None:
    if os.geteuid() != 0:
        raise NotSupported("the demo", "it creates memory cgroups and loads BPF programs; run it as root")
    from .. import _features

    _features.check_privileges()
    _features.check_btf()


class Flood:
    """One run: service in a fresh cgroup, clients outside, a sampler, a supervisor."""

    def __init__(self, name: str, guard: str, args: argparse.Namespace, limit: int) -> None:
        self.r = RunResult(name, guard)
        self.args = args
        self.limit = limit
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.port = 0
        self.port_ready = threading.Event()
        self.t0 = 0.0

    def start_service(self, cg: ChildCgroup) -> None:
        argv = [sys.executable, "-m", "rtml_ebpf._demo_service", "--guard", self.r.guard,
                "--threshold", str(self.args.threshold), "--payload-mib", str(self.args.payload_mib),
                "--hold", str(self.args.hold)]
        p = cg.popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        assert p.stdout is not None
        line = p.stdout.readline()
        if not line.strip().isdigit():
            raise RuntimeError(f"the demo service did not start (exit {p.poll()})")
        self.service = p
        self.port = int(line)
        self.port_ready.set()

    def supervise(self, cg: ChildCgroup) -> None:
        while not self.stop.is_set():
            if self.service.poll() is not None:
                self.port_ready.clear()
                with self.lock:
                    if self.r.time_to_first_oom_s is None and cg.oom_kills() > 0:
                        self.r.time_to_first_oom_s = round(time.monotonic() - self.t0, 2)
                    self.r.restarts += 1
                if self.stop.is_set():
                    return
                self.start_service(cg)
            time.sleep(0.02)

    def sample(self, cg: ChildCgroup) -> None:
        while not self.stop.is_set():
            try:
                usage = cg.usage()
            except OSError:
                return
            self.r.samples.append((round(time.monotonic() - self.t0, 3), usage))
            self.r.peak_bytes = max(self.r.peak_bytes, usage)
            time.sleep(0.02)

    def client(self) -> None:
        while not self.stop.is_set():
            if not self.port_ready.wait(timeout=0.2):
                continue
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
                conn.request("GET", "/work")
                status = conn.getresponse().status
                conn.close()
            except (OSError, http.client.HTTPException):
                with self.lock:
                    self.r.failed += 1
                time.sleep(0.05)
                continue
            with self.lock:
                if status == 200:
                    self.r.served += 1
                elif status == 503:
                    self.r.rejected += 1
                else:
                    self.r.failed += 1
            if status == 503:
                time.sleep(0.05)  # honour a short back-off, as clients with Retry-After do

    def run(self, on_tick: Any = None) -> RunResult:
        with ChildCgroup(self.limit, prefix="rtml-demo") as cg:
            self.start_service(cg)
            self.t0 = time.monotonic()
            threads = [threading.Thread(target=self.supervise, args=(cg,), daemon=True),
                       threading.Thread(target=self.sample, args=(cg,), daemon=True)]
            threads += [threading.Thread(target=self.client, daemon=True) for _ in range(self.args.clients)]
            for t in threads:
                t.start()
            try:
                while time.monotonic() - self.t0 < self.args.duration:
                    time.sleep(0.1)
                    if on_tick:
                        on_tick(self)
            finally:
                self.stop.set()
                for t in threads:
                    t.join(timeout=15)
                self.r.oom_kills = cg.oom_kills()
                peak = cg.peak()
                if peak:
                    self.r.peak_bytes = max(self.r.peak_bytes, peak)
        return self.r


def plot(results: list[RunResult], limit: int, threshold: float, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(results), 1, figsize=(10, 2.4 * len(results)), sharex=True, squeeze=False)
    colors = {"none": "tab:red", "poll": "tab:orange", "ebpf": "tab:green"}
    for ax, r in zip(axes[:, 0], results, strict=True):
        if r.samples:
            xs, ys = zip(*r.samples, strict=True)
            ax.plot(xs, [y / MiB for y in ys], color=colors.get(r.guard), linewidth=1.2)
        ax.axhline(limit / MiB, color="black", linewidth=1, label="limit")
        ax.axhline(limit * threshold / MiB, color="gray", linestyle="--", linewidth=1, label="threshold")
        ax.set_title(f"{r.name}: {r.oom_kills} OOM kills, {r.served} served, {r.rejected} rejected, "
                     f"{r.failed} failed", fontsize=10, loc="left")
        ax.set_ylabel("MiB")
        ax.set_ylim(0, limit / MiB * 1.12)
    axes[0, 0].legend(loc="lower right", fontsize=8)
    axes[-1, 0].set_xlabel("seconds")
    fig.suptitle("Flood survival: cgroup memory usage, same service and load, three guards")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def results_table(results: list[RunResult], limit: int) -> Any:
    from rich.table import Table

    t = Table(title=f"Flood survival, limit {limit // MiB} MiB")
    for col in ("run", "OOM kills", "served", "rejected (503)", "failed", "peak / limit", "first OOM kill"):
        t.add_column(col, justify="right" if col != "run" else "left")
    for r in results:
        t.add_row(r.name, ("[red]" if r.oom_kills else "[green]") + str(r.oom_kills), str(r.served),
                  str(r.rejected), str(r.failed), f"{r.peak_bytes / MiB:.0f} / {limit // MiB} MiB",
                  f"{r.time_to_first_oom_s:.1f} s" if r.time_to_first_oom_s is not None else "-")
    return t


def run_demo(args: argparse.Namespace) -> int:
    from rich.console import Console

    limit = parse_size(args.limit)
    if not 0 < args.threshold < 1:
        raise ConfigError(f"--threshold={args.threshold}: pass a fraction in (0, 1), e.g. 0.8")
    preflight()
    console = Console(stderr=args.json)
    os.makedirs(args.out, exist_ok=True)
    results: list[RunResult] = []
    for name, guard in GUARDS:
        flood = Flood(name, guard, args, limit)
        if args.json:
            results.append(flood.run())
            continue
        from rich.live import Live

        def status(f: Flood) -> str:
            usage = f.r.samples[-1][1] if f.r.samples else 0
            return (f"[bold]{f.r.name}[/bold]  {time.monotonic() - f.t0:4.1f}/{args.duration:.0f} s  "
                    f"usage {usage / MiB:5.0f} MiB  served {f.r.served}  rejected {f.r.rejected}  "
                    f"failed {f.r.failed}  restarts {f.r.restarts}")

        with Live(status(flood), console=console, refresh_per_second=8, transient=True) as live:
            results.append(flood.run(on_tick=lambda f, live=live: live.update(status(f))))
        console.print(f"done: {name}")
    png = os.path.join(args.out, "flood.png")
    plot(results, limit, args.threshold, png)
    summary = {
        "limit_bytes": limit,
        "threshold": args.threshold,
        "duration_s": args.duration,
        "clients": args.clients,
        "payload_mib": args.payload_mib,
        "plot": png,
        "runs": [{k: v for k, v in asdict(r).items() if k != "samples"} for r in results],
    }
    with open(os.path.join(args.out, "flood.json"), "w") as f:
        json.dump({**summary, "samples": {r.name: r.samples for r in results}}, f)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        console.print(results_table(results, limit))
        console.print(f"plot: {png}")
    return 0
