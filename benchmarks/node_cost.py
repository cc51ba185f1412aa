"""P11: what the node pays against the number of guarded processes (issue 20).

A C fault storm (storm.c) in a neighbour cgroup nobody watches. Beside it, N root processes
(N = 1, 8, 32), each with ``Limiter()`` (``auto``) in a memory cgroup of its own, holding it:

- ``shared``: no node agent; the first process starts the node's shared load, the others join;
- ``agent``: ``rtml-ebpf agent`` runs (private socket, --no-pin, watching only the guarded cgroups);
- ``own``: the figure before issue 20, each process loading its own programs (RTML_SHARED=0),
  for N = 1 and 8 only.

Interleaved: each round runs the baseline (no guarded process) and every variant once, in the
same order, so load on the machine hits them alike; overhead is the storm's wall time against
the baseline of its round, as median and spread over the rounds. Per variant also: the number
of attached programs (programs named handle_* that the guarded processes or their agent hold),
and, in the first round, the programs' per-event run time in the neighbour
(kernel.bpf_stats_enabled). The target: 32 processes cost no more than 1 plus 2 points.

    python -m benchmarks.run --only P11 [--quick]
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

from benchmarks.faultstorm import PAGES, bpf_stats_setting, set_bpf_stats, storm_seconds
from rtml_ebpf.backends import shared

MiB = 1 << 20
HOLD = ("import sys, rtml_ebpf; lim = rtml_ebpf.Limiter(relief=False); "
        "print(lim.backend, flush=True); sys.stdin.read()")
COUNTS = (1, 8, 32)
OWN_COUNTS = (1, 8)


def _prog_ids_held(pids: list[int]) -> set[int]:
    ids: set[int] = set()
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fdinfo")
        except OSError:
            continue
        for fd in fds:
            try:
                with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                    ids.update(int(line.split()[1]) for line in f if line.startswith("prog_id:"))
            except OSError:
                continue
    return ids


def _attached(ids: set[int]) -> dict[int, str]:
    """Of ``ids``, the hook programs (named handle_*), id -> name."""
    out = subprocess.run(["bpftool", "-j", "prog", "show"], capture_output=True, text=True, check=True).stdout
    return {int(p["id"]): p.get("name", "") for p in json.loads(out)
            if int(p["id"]) in ids and str(p.get("name", "")).startswith("handle_")}


def _run_stats(ids: list[int]) -> tuple[int, int]:
    """Summed (run_time_ns, run_cnt) of the programs ``ids``."""
    t = n = 0
    for pid in ids:
        info = json.loads(subprocess.run(["bpftool", "-j", "prog", "show", "id", str(pid)], capture_output=True,
                                         text=True, check=True).stdout)
        t += int(info.get("run_time_ns", 0))
        n += int(info.get("run_cnt", 0))
    return t, n


class _NodeAgent:
    def __init__(self, glob: str, tmp: str) -> None:
        self.socket = os.path.join(tmp, "agent.sock")
        self.log = open(os.path.join(tmp, "agent.log"), "a")
        self._log_start = self.log.tell()  # this agent's lines only (one log for every rep)
        self.proc = subprocess.Popen([sys.executable, "-m", "rtml_ebpf.cli", "agent", "--socket", self.socket,
                                      "--no-pin", "--watch", glob, "--metrics-addr", "off"],
                                     stdout=self.log, stderr=subprocess.STDOUT)
        # Ready when it logs "serving" (after its listener, just before its loop): the socket
        # alone appears earlier, and 32 clients asking then could wait past their timeout.
        deadline = time.monotonic() + 60
        while not (os.path.exists(self.socket) and self._said("serving ")):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"P11: the agent did not start ({self.proc.returncode})")
            time.sleep(0.05)

    def _said(self, words: str) -> bool:
        self.log.flush()
        with open(self.log.name) as f:
            f.seek(self._log_start)
            return words in f.read()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=30)
        self.log.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket)


@contextlib.contextmanager
def _guarded(cgs: list[Any], n: int, env: dict[str, str], want: str) -> Iterator[list[int]]:
    """``n`` root processes holding a Limiter each, in the first ``n`` cgroups: their pids."""
    procs = [cg.popen([sys.executable, "-c", HOLD], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                      stderr=subprocess.PIPE) for cg in cgs[:n]]
    try:
        for p in procs:
            assert p.stdout is not None
            got = p.stdout.readline().strip()
            if got != want:
                raise RuntimeError(f"P11: a guarded process got backend {got!r}, not {want!r}: "
                                   f"{p.stderr.read()[-2000:] if p.stderr and got == '' else ''}")
        yield [p.pid for p in procs]
    finally:
        for p in procs:
            with contextlib.suppress(OSError):
                if p.stdin is not None:
                    p.stdin.close()
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def p11_node_cost(reps: int, storm: str, counts: tuple[int, ...] = COUNTS) -> dict[str, Any]:
    from benchmarks.cgroups import ChildCgroup, children_glob

    run_storm = functools.partial(storm_seconds, storm)
    stats_before = bpf_stats_setting()
    tmp = tempfile.mkdtemp(prefix="rtml-bench-p11-")
    os.chmod(tmp, 0o700)
    shared_dir = os.path.join(tmp, "shared")
    os.mkdir(shared_dir, 0o700)
    pin_dir = f"/sys/fs/bpf/rtml-bench-p11-{uuid.uuid4().hex[:8]}"
    base_env = {"RTML_AGENT_SOCKET": os.path.join(tmp, "no-agent.sock"), "RTML_SHARED_DIR": shared_dir,
                "RTML_SHARED_PIN_DIR": pin_dir, "RTML_SHARED_IDLE": "1"}
    variants: list[tuple[str, int]] = [("shared", n) for n in counts] + [("agent", n) for n in counts] + \
        [("own", n) for n in OWN_COUNTS if n in counts]
    rows: dict[str, list[float]] = {"base": [], **{f"{k}-{n}": [] for k, n in variants}}
    programs: dict[str, int] = {}
    per_event: dict[str, float] = {}
    try:
        with ChildCgroup(None, prefix="rtml-bench-p11") as parent, \
                ChildCgroup(None, prefix="guarded", parent=parent.directory) as guarded_parent, \
                ChildCgroup(512 * MiB, prefix="neighbour", parent=parent.directory) as neighbour:
            glob = children_glob(guarded_parent.directory)
            cgs = [ChildCgroup(256 * MiB, prefix="g", parent=guarded_parent.directory) for _ in range(max(counts))]
            try:
                set_bpf_stats("0")
                run_storm(neighbour)  # warm-up
                for rep in range(reps):
                    rows["base"].append(run_storm(neighbour))
                    for kind, n in variants:
                        key = f"{kind}-{n}"
                        first = rep == 0
                        measure: Callable[[list[int]], None] = functools.partial(
                            _measure, rows[key], programs, per_event, key, first, run_storm, neighbour)
                        if kind == "agent":
                            agent = _NodeAgent(glob, tmp)
                            try:
                                env = {**base_env, "RTML_AGENT_SOCKET": agent.socket, "RTML_SHARED": "0"}
                                with _guarded(cgs, n, env, "agent") as pids:
                                    measure([*pids, agent.proc.pid])
                            finally:
                                agent.stop()
                        elif kind == "shared":
                            with _guarded(cgs, n, base_env, "agent") as pids:
                                measure([*pids, *shared.agent_pids(shared_dir)])
                            deadline = time.monotonic() + 30  # the last one out: it unloads
                            while shared.agent_pids(shared_dir) and time.monotonic() < deadline:
                                time.sleep(0.1)
                        else:
                            with _guarded(cgs, n, {**base_env, "RTML_SHARED": "0"}, "ebpf") as pids:
                                measure(pids)
            finally:
                for cg in cgs:
                    cg.close()
    finally:
        set_bpf_stats(stats_before)
        for pid in shared.agent_pids(shared_dir):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(pin_dir, ignore_errors=True)
        shutil.rmtree(tmp, ignore_errors=True)
    return _summarize(rows, programs, per_event)


def _measure(into: list[float], programs: dict[str, int], per_event: dict[str, float], key: str, first: bool,
             run_storm: Callable[[Any], float], neighbour: Any, pids: list[int]) -> None:
    attached = _attached(_prog_ids_held(pids))
    programs[key] = max(programs.get(key, 0), len(attached))
    into.append(run_storm(neighbour))
    if first and attached:
        ids = sorted(attached)
        set_bpf_stats("1")
        try:
            t0, n0 = _run_stats(ids)
            run_storm(neighbour)
            t1, n1 = _run_stats(ids)
        finally:
            set_bpf_stats("0")
        per_event[key] = (t1 - t0) / max(1, n1 - n0)
        per_event[key + " events per fault"] = (n1 - n0) / PAGES


def _spread(xs: list[float]) -> str:
    return f"{min(xs):.1f}-{max(xs):.1f}"


def _summarize(rows: dict[str, list[float]], programs: dict[str, int], per_event: dict[str, float]) -> dict[str, Any]:
    base = rows["base"]
    out: dict[str, Any] = {"pages_per_run": PAGES, "rounds": len(base), "base_s": statistics.median(base),
                           "variants": {}}
    for key, xs in rows.items():
        if key == "base" or not xs:
            continue
        pct = [(x / b - 1) * 100 for x, b in zip(xs, base, strict=True)]
        out["variants"][key] = {"overhead_pct": statistics.median(pct), "spread_pct": _spread(pct),
                                "programs": programs.get(key, 0), "per_event_ns": per_event.get(key),
                                "events_per_fault": per_event.get(key + " events per fault")}
    return out


def report_lines(p: dict[str, Any]) -> list[str]:
    """The P11 section of benchmarks/results/report.md."""
    v = p["variants"]
    lines = ["## P11 node cost against the number of guarded processes", "",
             "A C fault storm in a neighbour cgroup nobody watches; beside it N root processes, each with "
             "`Limiter()` (auto) in a cgroup of its own: `shared` with no node agent (the node's shared load), "
             "`agent` with `rtml-ebpf agent` running, `own` each loading its own programs (RTML_SHARED=0, the "
             f"figure before issue 20). {p['rounds']} interleaved rounds; overhead against the storm with no "
             "guarded process in the same round, median (min-max). Programs: attached hook programs the guarded "
             "processes and their agent hold. Per-event run time: kernel.bpf_stats_enabled, first round.", "",
             "| variant | N | storm overhead | attached programs | per-event run time |", "|---|---|---|---|---|"]
    for key, row in v.items():
        kind, n = key.rsplit("-", 1)
        ns = row["per_event_ns"]
        lines.append(f"| {kind} | {n} | {row['overhead_pct']:.1f}% ({row['spread_pct']}) | {row['programs']} | "
                     f"{'' if ns is None else f'{ns:.0f} ns'} |")
    for kind in ("shared", "agent"):
        one, many = v.get(f"{kind}-1"), v.get(f"{kind}-32")
        if one and many:
            ok = many["overhead_pct"] <= one["overhead_pct"] + 2
            lines.append("")
            lines.append(f"{kind}: 32 processes {many['overhead_pct']:.1f}% against 1 process "
                         f"{one['overhead_pct']:.1f}% (target: no more than 1 plus 2 points): "
                         f"{'met' if ok else '**missed**'}")
    lines.append("")
    return lines
