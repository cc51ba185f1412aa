"""P10, the node view: how soon an OOM kill reaches a reader, and what one frame of
``rtml-ebpf watch`` costs against an agent watching 1,000 cgroups.

Event latency: from the moment the kernel chose the victim (the event's own timestamp,
CLOCK_MONOTONIC in the program) to the moment `rtml-ebpf events`, subscribed to the agent,
printed its JSON line and this process read it. Frame: one scrape of the agent's /metrics,
parsed into rows, sorted and rendered (as `watch` does at every refresh), against the
refresh period of 4 Hz.
"""

from __future__ import annotations

import io
import json
import os
import select
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

from benchmarks.agent_scale import AgentProcess
from benchmarks.common import spread

MiB = 1 << 20
KILL = "b = bytearray(256 << 20)"


def p10_node_view(kills: int, frames: int, cgroups: int = 1000) -> dict[str, Any]:
    from benchmarks.cgroups import ChildCgroup, children_glob

    res: dict[str, Any] = {"kills": kills, "cgroups": cgroups}
    tmp = tempfile.mkdtemp(prefix="rtml-bench-view-")
    with ChildCgroup(None, prefix="rtml-bench-view") as parent:
        glob = children_glob(parent.directory)
        with ChildCgroup(32 * MiB, prefix="victims", parent=parent.directory) as victims:
            agent = AgentProcess(glob, "auto", tmp)
            try:
                res["latency_ms"], res["source"] = _event_latency(agent, victims, kills)
                extra = [ChildCgroup(64 * MiB, prefix="c", parent=parent.directory) for _ in range(cgroups - 1)]
                try:
                    deadline = time.monotonic() + 120
                    while agent.watched() < cgroups and time.monotonic() < deadline:
                        time.sleep(0.1)
                    res["watched"] = agent.watched()
                    res["frame_ms"] = _frame_ms(agent, frames)
                    res["live_hz"] = _live_hz(agent, 8.0)
                finally:
                    for c in extra:
                        c.close()
            finally:
                agent.stop()
    for key in ("latency_ms", "frame_ms"):
        xs = res[key]
        res[key] = {"median": statistics.median(xs), "p99": sorted(xs)[max(0, int(len(xs) * 0.99) - 1)],
                    "spread": spread(xs)}
    return res


def _event_latency(agent: AgentProcess, victims: Any, kills: int) -> tuple[list[float], str]:
    reader = subprocess.Popen([sys.executable, "-m", "rtml_ebpf.cli", "events", "--source", "agent", "--socket",
                               agent.socket], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1)
    assert reader.stdout is not None and reader.stderr is not None
    try:
        note = reader.stderr.readline()
        if "OOM kills from" not in note:
            raise RuntimeError(f"P10: the events reader did not subscribe: {note}")
        source = "bpf" if "source bpf" in note else "memory.events"
        time.sleep(1.5)  # memory.events source: its baseline read
        out: list[float] = []
        for _ in range(kills):
            p = victims.popen([sys.executable, "-c", KILL], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            # the line is timed as it arrives, not after the victim has finished dying
            ready, _, _ = select.select([reader.stdout], [], [], 10)
            if not ready:
                raise RuntimeError("P10: no event within 10 s of an OOM kill")
            line = reader.stdout.readline()
            got = time.time()
            out.append((got - json.loads(line)["time"]) * 1e3)
            p.wait(timeout=60)
        return out, source
    finally:
        reader.kill()
        reader.wait()


def _metrics_url(agent: AgentProcess) -> str:
    import re

    agent.log.flush()
    with open(agent.log.name) as f:
        return str(re.findall(r"metrics at (http://\S+/metrics)", f.read())[-1])


def _live_hz(agent: AgentProcess, seconds: float) -> dict[str, float]:
    """The live view as `watch` runs it (fetch on its thread, draw every 0.25 s): frames drawn
    and fresh readings per second."""
    from rich.console import Console
    from rich.live import Live

    from rtml_ebpf import watch

    source = watch.AgentSource(_metrics_url(agent))
    fetcher = watch.Fetcher(source, (), 0.25)
    try:
        fetcher.wait(10)
        with Live(console=Console(file=io.StringIO(), width=200), auto_refresh=False) as live:
            t0, f0 = time.monotonic(), fetcher.fetches
            frames = watch.draw(live, fetcher, source.what, 0.25, 40, frames=int(seconds * 4))
            elapsed, fetched = time.monotonic() - t0, fetcher.fetches - f0
    finally:
        fetcher.stop()
    return {"frames_hz": frames / elapsed, "fresh_hz": fetched / elapsed}


def _frame_ms(agent: AgentProcess, frames: int) -> list[float]:
    from rich.console import Console

    from rtml_ebpf import watch

    source = watch.AgentSource(_metrics_url(agent))
    console = Console(file=io.StringIO(), width=200)
    out = []
    for _ in range(frames):
        t = time.perf_counter()
        rows = watch.by_least_headroom(watch.keep(source.rows(), ()))
        console.print(watch.table(rows, source.what, 40))
        out.append((time.perf_counter() - t) * 1e3)
        console.file = io.StringIO()
    if os.environ.get("RTML_BENCH_SHOW_FRAME"):
        Console(width=200).print(watch.table(rows, source.what, 10))
    return out


def report_lines(p: dict[str, Any]) -> list[str]:
    """The P10 section of benchmarks/results/report.md."""
    def verdict(ok: bool) -> str:
        return "met" if ok else "**missed**"

    lat, frame, live = p["latency_ms"], p["frame_ms"], p["live_hz"]
    return ["## P10 the node view", "",
            f"OOM kill to JSON line: {p['kills']} processes OOM-killed in a 32 MiB cgroup watched by the agent; "
            "`rtml-ebpf events` subscribed to the agent prints each kill, this process reads the line (source "
            f"`{p['source']}`). Frame: one refresh of `rtml-ebpf watch` done in line (GET /metrics, parse, "
            f"sort, render 40 rows) against the agent watching {p['watched']} cgroups. Live: `watch` as it runs "
            "(readings on their own thread, a frame every 0.25 s) for 8 s: frames drawn and fresh readings "
            "per second.", "",
            "| figure | median | p99 | spread | target |", "|---|---|---|---|---|",
            f"| OOM kill → JSON line | {lat['median']:.1f} ms | {lat['p99']:.1f} ms | {lat['spread']} ms | "
            f"≤ 100 ms: {verdict(lat['p99'] <= 100)} |",
            f"| `watch` frame, {p['watched']} cgroups | {frame['median']:.0f} ms | {frame['p99']:.0f} ms | "
            f"{frame['spread']} ms | |",
            f"| `watch` live, {p['watched']} cgroups | {live['frames_hz']:.1f} frames/s, {live['fresh_hz']:.1f} "
            f"fresh readings/s | | | ≥ 4 Hz: {verdict(live['frames_hz'] >= 3.9 and live['fresh_hz'] >= 3.9)} |", ""]
