"""``rtml-ebpf demo``: flood real services in real memory cgroups and count the OOM kills.

Part 1, the check inside the handler (a threaded http.server that asks before each 1 MiB
chunk): unguarded; a 1 s poll of the cgroup usage (OpenTelemetry memory_limiter style);
``is_mem_limit_reached()`` on the eBPF backend.

Part 2, the deployment users have: gunicorn pre-fork (``--preload``, 4 gthread workers x 8
threads), the WSGI middleware added and nothing else. Rows: unguarded; the check at the door
only; budget admission fed by the kernel; the same on a 10 ms poll of the cgroup files; then
the last two again with a tight margin (threshold 0.95).

Part 3, the pod users run: the same gunicorn, as uid 65534 with no capabilities (no bpf()),
guarded through the node agent (``rtml-ebpf agent``, started for the row on a private socket).

Part 4, the services users write next (rtml_ebpf.demo.requests): FastAPI ``def`` endpoints,
uploads whose memory grows with their body, and a request that overruns its estimate ten times.

Each run gets a fresh child cgroup with the same limit, the same service code and the same
load from clients outside the cgroup; a service that dies is restarted, as kubelet would.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

from .. import config
from ..errors import ConfigError, NotSupported
from .flood import Flood, RunResult, Server, gunicorn_server
from .witness import LEGEND, OomWitness, victims
from .witness import summary as victims_summary

MiB = 1 << 20
PARTS = ("handler", "prefork", "agent", "requests")


@dataclass(frozen=True)
class Scenario:
    part: str
    name: str
    guard: str  # what the row's guard is: none, poll, ebpf (part 1); an app.GUARDS value (part 2)
    threshold: float
    app: str = ""  # part 4: which of requests.APPS


def scenarios(threshold: float, tight: float) -> list[Scenario]:
    return [
        Scenario("handler", "unguarded", "none", threshold),
        Scenario("handler", "poll 1s", "poll", threshold),
        Scenario("handler", "rtml-ebpf", "ebpf", threshold),
        Scenario("prefork", "pre-fork unguarded", "none", threshold),
        Scenario("prefork", "pre-fork door check", "door", threshold),
        Scenario("prefork", "pre-fork admission", "admission", threshold),
        Scenario("prefork", "pre-fork admission, poll 10ms", "poll-admission", threshold),
        Scenario("prefork", f"tight {tight}: admission", "admission", tight),
        Scenario("prefork", f"tight {tight}: admission, poll 10ms", "poll-admission", tight),
        Scenario("agent", "uid 65534: admission via the node agent", "admission", threshold),
        Scenario("requests", "FastAPI def, uvicorn x2: unguarded", "none", threshold, "fastapi"),
        Scenario("requests", "FastAPI def, uvicorn x2: middleware", "admission", threshold, "fastapi"),
        Scenario("requests", "uploads, heavy tail: unguarded", "none", threshold, "upload"),
        Scenario("requests", "uploads, heavy tail: middleware", "admission", threshold, "upload"),
        Scenario("requests", "10x overrun: unguarded", "none", threshold, "overrun"),
        Scenario("requests", "10x overrun: middleware", "admission", threshold, "overrun"),
    ]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--limit", default="256Mi", help="memory limit of the service's cgroup (default 256Mi)")
    p.add_argument("--threshold", type=float, default=0.8, help="guard threshold, fraction of the limit")
    p.add_argument("--tight-threshold", type=float, default=0.95, help="the tight-margin rows' threshold")
    p.add_argument("--duration", type=float, default=12.0, help="seconds of flood per run (default 12)")
    p.add_argument("--clients", type=int, default=48, help="concurrent clients (default 48)")
    p.add_argument("--payload-mib", type=int, default=24, help="MiB each request builds and holds")
    p.add_argument("--hold", type=float, default=0.3, help="seconds each request holds its payload")
    p.add_argument("--parts", default="handler,prefork,agent,requests",
                   help="which parts to run: handler (check in the handler), prefork (middleware only), agent "
                        "(the service unprivileged, through the node agent), requests (FastAPI def endpoints, "
                        "uploads of varying size, a 10x overrun)")
    p.add_argument("--out", default="demo-results", help="directory for flood.png and flood.json")
    p.add_argument("--json", action="store_true", help="print the results as JSON (no live display)")


def parse_size(text: str) -> int:
    return config.parse_size(text, name="--limit")


def check_args(args: argparse.Namespace) -> list[Scenario]:
    for name in ("threshold", "tight_threshold"):
        value = getattr(args, name)
        if not 0 < value < 1:
            raise ConfigError(f"--{name.replace('_', '-')}={value}: pass a fraction in (0, 1), e.g. 0.8")
    for name, low in (("duration", 1.0), ("clients", 1), ("payload_mib", 1), ("hold", 0.0)):
        if getattr(args, name) < low:
            raise ConfigError(f"--{name.replace('_', '-')}={getattr(args, name)}: must be at least {low}")
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    if not parts or any(p not in PARTS for p in parts):
        raise ConfigError(f"--parts={args.parts!r}: a comma list of {', '.join(PARTS)}")
    return [s for s in scenarios(args.threshold, args.tight_threshold) if s.part in parts]


def preflight(chosen: list[Scenario]) -> None:
    if os.geteuid() != 0:
        raise NotSupported("the demo", "it creates memory cgroups and loads BPF programs; run it as root")
    from ..ebpf import probes as _features

    _features.check_privileges()
    _features.check_btf()
    if any(s.part in ("prefork", "agent") for s in chosen):
        import importlib.util

        if importlib.util.find_spec("gunicorn") is None:
            raise NotSupported("the pre-fork demo", "gunicorn is not installed; pip install 'rtml-ebpf[demo]'")
    for s in chosen:
        if s.part == "requests":
            import importlib.util

            from .requests import MODULES

            missing = [m for m in MODULES[s.app] if importlib.util.find_spec(m) is None]
            if missing:
                raise NotSupported("the requests part of the demo", f"{', '.join(missing)} not installed; "
                                   "pip install 'rtml-ebpf[demo]'")



def drop_unrunnable(chosen: list[Scenario], console: Any) -> tuple[list[Scenario], list[dict[str, str]]]:
    """The unprivileged row needs a Python that uid 65534 can run with this package: without
    one it is left out with the reason (the whole demo fails only if nothing else was asked)."""
    if not any(s.part == "agent" for s in chosen):
        return chosen, []
    from .unprivileged import unprivileged_python

    try:
        unprivileged_python()
        return chosen, []
    except NotSupported as exc:
        rest = [s for s in chosen if s.part != "agent"]
        if not rest:
            raise
        console.print(f"[yellow]skipping the unprivileged row[/yellow]: {exc}")
        return rest, [{"name": s.name, "why": str(exc)} for s in chosen if s.part == "agent"]


def server_for(s: Scenario, args: argparse.Namespace, agent_socket: str | None = None) -> Server:
    env = {"RTML_THRESHOLD": str(s.threshold), "RTML_METRIC": "usage",
           "RTML_DEMO_PAYLOAD_MIB": str(args.payload_mib), "RTML_DEMO_HOLD": str(args.hold)}
    if s.part == "requests":
        from . import requests

        return requests.server(s.app, s.guard, env)
    if s.part == "agent":
        from .unprivileged import unprivileged_server

        return unprivileged_server(s.guard, env={**env, "RTML_AGENT_SOCKET": agent_socket or ""})
    if s.part == "handler":
        argv = (sys.executable, "-m", "rtml_ebpf.demo.service", "--guard", s.guard, "--threshold",
                str(s.threshold), "--payload-mib", str(args.payload_mib), "--hold", str(args.hold),
                "--port", "{port}")
        return Server(argv, tuple(env.items()))
    return gunicorn_server(s.guard, env=env)


def plot(results: list[RunResult], limit: int, thresholds: list[float], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(results), 1, figsize=(10, 1.9 * len(results)), sharex=True, squeeze=False)
    for ax, r, th in zip(axes[:, 0], results, thresholds, strict=True):
        color = "tab:red" if r.oom_kills else "tab:green"
        if r.samples:
            xs, ys = zip(*r.samples, strict=True)
            ax.plot(xs, [y / MiB for y in ys], color=color, linewidth=1.1)
        ax.axhline(limit / MiB, color="black", linewidth=1, label="limit")
        ax.axhline(limit * th / MiB, color="gray", linestyle="--", linewidth=1, label="threshold")
        ax.set_title(f"{r.name}: {r.oom_kills} OOM kills, {r.served} served, {r.rejected} rejected, "
                     f"{r.failed} failed", fontsize=9, loc="left")
        ax.set_ylabel("MiB")
        ax.set_ylim(0, limit / MiB * 1.12)
    axes[0, 0].legend(loc="lower right", fontsize=8)
    axes[-1, 0].set_xlabel("seconds")
    fig.suptitle("Flood survival: cgroup memory usage, same service and load, each guard")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


COLUMNS = ("run", "guard on", "OOM kills", "served", "rejected (503)", "ended (503)", "failed", "peak / limit",
           "first OOM kill", "victims (OOM hook)")


def _cells(r: RunResult, limit: int) -> list[str]:
    return [r.name, r.backend or "-", str(r.oom_kills), str(r.served), str(r.rejected), str(r.ended), str(r.failed),
            f"{r.peak_bytes / MiB:.0f} / {limit // MiB} MiB",
            f"{r.time_to_first_oom_s:.1f} s" if r.time_to_first_oom_s is not None else "-",
            victims_summary(r.oom_events, r.oom_kills) if r.oom_kills or r.oom_events else "-"]


def results_table(results: list[RunResult], limit: int) -> Any:
    from rich.table import Table

    t = Table(title=f"Flood survival, limit {limit // MiB} MiB", caption=LEGEND)
    for col in COLUMNS:
        t.add_column(col, justify="right" if col not in ("run", "guard on", "victims (OOM hook)") else "left")
    for r in results:
        cells = _cells(r, limit)
        cells[2] = ("[red]" if r.oom_kills else "[green]") + cells[2]
        t.add_row(*cells)
    return t


def plain_table(results: list[RunResult], limit: int) -> str:
    """The table for a log (stdout not a terminal): one line per row, no wrapping, no colour."""
    rows = [list(COLUMNS), *(_cells(r, limit) for r in results)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    left = {0, 1, len(COLUMNS) - 1}

    def line(row: list[str]) -> str:
        return "  ".join(c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths,
                                                                                               strict=True))).rstrip()

    return "\n".join([f"Flood survival, limit {limit // MiB} MiB", *map(line, rows), LEGEND])


def _flood(s: Scenario, args: argparse.Namespace, limit: int, console: Any, agent_socket: str | None) -> RunResult:
    clients, mix = args.clients, None
    if s.part == "requests":
        from . import requests

        clients, mix = requests.load(s.app, args.clients)
    flood = Flood(s.name, s.guard, server_for(s, args, agent_socket), limit=limit, duration=args.duration,
                  clients=clients, mix=mix)
    if args.json:
        return flood.run()
    from rich.live import Live

    def status(f: Flood) -> str:
        usage = f.r.samples[-1][1] if f.r.samples else 0
        return (f"[bold]{f.r.name}[/bold]  {time.monotonic() - f.t0:4.1f}/{args.duration:.0f} s  "
                f"usage {usage / MiB:5.0f} MiB  served {f.r.served}  rejected {f.r.rejected}  "
                f"failed {f.r.failed}  restarts {f.r.restarts}")

    with Live(status(flood), console=console, refresh_per_second=8, transient=True) as live:
        def tick(f: Flood, live: Live = live) -> None:
            live.update(status(f))

        return flood.run(on_tick=tick)


def _rows(chosen: list[Scenario], args: argparse.Namespace, limit: int, console: Any,
          witness: OomWitness) -> list[RunResult]:
    """Each scenario's flood in turn, with the victims the OOM hook saw during it."""
    results: list[RunResult] = []
    for s in chosen:
        if s.part == "agent":
            from .unprivileged import DemoAgent

            with DemoAgent() as agent:  # only for its row: its programs would run during the others
                results.append(_flood(s, args, limit, console, agent.socket))
        else:
            results.append(_flood(s, args, limit, console, None))
        r = results[-1]
        r.oom_events = witness.take()
        if r.backend is None and s.part == "handler" and s.guard != "none":
            r.backend = s.guard  # the in-handler service has no stats route; its guard is explicit
        victims = f"; victims seen by the OOM hook: {victims_summary(r.oom_events, r.oom_kills)}" \
            if r.oom_events else ""
        console.print(f"done: {s.name} ({r.oom_kills} OOM kills, guard on {r.backend}{victims})")
    return results


def run_demo(args: argparse.Namespace) -> int:
    from rich.console import Console

    limit = parse_size(args.limit)
    chosen = check_args(args)
    preflight(chosen)
    console = Console(stderr=args.json)
    chosen, skipped = drop_unrunnable(chosen, console)
    os.makedirs(args.out, exist_ok=True)
    witness = OomWitness()
    if witness.why:
        console.print(f"OOM events: {witness.why}")
    try:
        results = _rows(chosen, args, limit, console, witness)
    finally:
        witness.close()
    png = os.path.join(args.out, "flood.png")
    plot(results, limit, [s.threshold for s in chosen], png)
    summary = {
        "limit_bytes": limit,
        "threshold": args.threshold,
        "tight_threshold": args.tight_threshold,
        "duration_s": args.duration,
        "clients": args.clients,
        "payload_mib": args.payload_mib,
        "plot": png,
        "skipped": skipped,
        "runs": [{"part": s.part, "threshold": s.threshold, **{k: v for k, v in asdict(r).items() if k != "samples"},
                  **dict(zip(("victim_processes", "victim_thread_marks"), victims(r.oom_events), strict=True))}
                 for s, r in zip(chosen, results, strict=True)],
    }
    with open(os.path.join(args.out, "flood.json"), "w") as f:
        json.dump({**summary, "samples": {r.name: r.samples for r in results}}, f)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        if console.is_terminal:
            console.print(results_table(results, limit))
        else:  # a log: rich would wrap every cell at 80 columns
            print(plain_table(results, limit), flush=True)
        console.print(f"plot: {png}")
    return 0
