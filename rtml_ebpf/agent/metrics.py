"""The agent's Prometheus endpoint: every watched cgroup as the programs see it, with kubelet
labels, and the agent's own health. Text exposition format 0.0.4, written here (no client
library in the agent); rendered on the HTTP thread (httpd.py) from an :class:`AgentView` the
loop publishes (the figures of the agent, the watched slots): never from the Agent itself, whose
state only the loop touches. Bound to loopback by default.

Series of a cgroup go with it when it is unwatched: cardinality is the watched set.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .._growth import RateEwma, seconds_to
from .._high import binding, ceiling
from .._kube import pod_labels
from .._psi import read_pressure
from ..config import PAGE_SIZE
from ..ebpf import abi

if TYPE_CHECKING:
    from ..ebpf.slots import Slots, SlotState

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LABELS = ("cgroup", "pod_uid", "container_id", "qos", "runtime")

# (name, type, help) of the per-cgroup families, in output order
CGROUP_FAMILIES = (
    ("rtml_cgroup_usage_bytes", "gauge", "The cgroup's own page counter (memory.current / usage_in_bytes)."),
    ("rtml_cgroup_working_set_bytes", "gauge", "Usage as the tightest ancestor sees it, minus inactive file cache."),
    ("rtml_cgroup_limit_bytes", "gauge", "The tightest memory limit on the path to the root (absent: unlimited)."),
    ("rtml_cgroup_high_bytes", "gauge", "The lowest memory.high on the path (cgroup v2; absent: none set, and on v1)."),
    ("rtml_cgroup_ceiling_bytes", "gauge", "What fractional thresholds apply to: the lower of limit and high; the "
     "binding label says which (max or high)."),
    ("rtml_cgroup_headroom_bytes", "gauge", "Bytes left before the OOM killer acts (least over limited ancestors)."),
    ("rtml_cgroup_threshold_bytes", "gauge", "The lowest trip point of the clients' thresholds (absent: no client)."),
    ("rtml_cgroup_charged_bytes_total", "counter", "Pages charged to the cgroup's subtree since watched, by kind."),
    ("rtml_cgroup_uncharged_bytes_total", "counter", "Pages uncharged from the subtree since watched, by kind."),
    ("rtml_cgroup_oom_kills_total", "counter", "OOM victims chosen in the subtree since watched (memory.events "
     "where the oom_victim hook is missing)."),
    ("rtml_cgroup_trips_total", "counter", "Clear-to-tripped transitions of the clients' thresholds."),
    ("rtml_cgroup_growth_bytes_per_second", "gauge", "Growth of usage, smoothed over about a second of readings."),
    ("rtml_cgroup_seconds_to_limit", "gauge", "At that growth, seconds until the limit (absent: not growing)."),
    ("rtml_cgroup_pressure_avg10", "gauge", "memory.pressure (PSI, cgroup v2): percent of the last 10 s in which "
     "some (or all: stall=\"full\") tasks of the cgroup stalled on memory (absent: no PSI, as on cgroup v1)."),
    ("rtml_cgroup_pressure_stalled_seconds_total", "counter", "memory.pressure total: time some (or all) tasks "
     "stalled on memory."),
    ("rtml_cgroup_stalling", "gauge", "1 while the agent's PSI trigger on the cgroup fired within its window "
     "(agent/psi.py)."),
)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(values: dict[str, str]) -> str:
    return ",".join(f'{k}="{_escape(v)}"' for k, v in values.items())


@dataclass(frozen=True)
class AgentView:
    """What the loop publishes for the metrics: replaced whole, never changed in place."""

    slots: Slots
    cgroups: tuple[tuple[int, SlotState], ...]  # (cgroup id, its slot) of each watched cgroup
    capacity: int
    hooks: tuple[str, ...]
    adopted: bool
    clients: int = 0
    served: int = 0
    errors: int = 0
    oom_source: str = "bpf"
    oom_events: int = 0
    oom_lost: int = 0
    events_dropped: int = 0
    run_stats: dict[str, tuple[int, int]] = field(default_factory=dict)


class NodeMetrics:
    """Per-cgroup growth readings (taken at each agent tick) and the exposition."""

    def __init__(self) -> None:
        self.growth: dict[int, RateEwma] = {}
        self.labels: dict[int, tuple[str, dict[str, str]]] = {}  # cgroup id -> (label text, labels)
        self.scrapes = 0
        self.last_scrape_seconds = 0.0

    def sample(self, view: AgentView) -> None:
        """From the loop: one usage reading per watched cgroup for the growth rate (word reads,
        no syscall)."""
        now = time.monotonic_ns()
        by_cgid = dict(view.cgroups)
        for cgid in [c for c in self.growth if c not in by_cgid]:
            self.growth.pop(cgid, None)
            self.labels.pop(cgid, None)
        for cgid, state in by_cgid.items():
            g = self.growth.get(cgid)
            if g is None:
                g = self.growth[cgid] = RateEwma()
            g.add(now, view.slots.used_bytes(state.index))

    def _labels_of(self, cgid: int, path: str) -> tuple[str, dict[str, str]]:
        cached = self.labels.get(cgid)
        if cached is None:
            pod = pod_labels(path)
            base = {"cgroup": path, "pod_uid": pod.pod_uid if pod else "",
                    "container_id": (pod.container_id or "") if pod else "", "qos": pod.qos if pod else "",
                    "runtime": (pod.runtime or "") if pod else ""}
            cached = self.labels[cgid] = (_labels(base), base)
        return cached

    def render(self, view: AgentView) -> bytes:
        """From the HTTP thread: the exposition of ``view`` (slot reads are memory reads; a
        cgroup unwatched meanwhile may be skipped or read once more, never crash a scrape)."""
        t0 = time.perf_counter()
        rows: dict[str, list[str]] = {name: [] for name, _, _ in CGROUP_FAMILIES}
        slots = view.slots
        trips_offset = abi.Slot.trips.offset // 8
        trip_pages_offset = abi.Slot.trip_pages.offset // 8
        for cgid, state in view.cgroups:
            try:
                snap = slots.snapshot(state, full=True, refresh_from_files=False)
                w = slots.words
                base_word = state.index * abi.SLOT_WORDS + trips_offset
                trips = sum(w[base_word : base_word + abi.MAX_RULES]) if w is not None else 0
                first = state.index * abi.SLOT_WORDS + trip_pages_offset
                points = [w[first + i] for i in state.rules] if w is not None else []
            except Exception:  # noqa: BLE001 - a cgroup going away mid-scrape: skip it
                continue
            lab, base = self._labels_of(cgid, state.cgroup.path)
            rows["rtml_cgroup_usage_bytes"].append(f"rtml_cgroup_usage_bytes{{{lab}}} {snap.usage}")
            rows["rtml_cgroup_working_set_bytes"].append(f"rtml_cgroup_working_set_bytes{{{lab}}} {snap.working_set}")
            if snap.limit is not None:
                rows["rtml_cgroup_limit_bytes"].append(f"rtml_cgroup_limit_bytes{{{lab}}} {snap.limit}")
                rows["rtml_cgroup_headroom_bytes"].append(f"rtml_cgroup_headroom_bytes{{{lab}}} {snap.headroom}")
            high = getattr(snap, "high", None)
            if high is not None:
                rows["rtml_cgroup_high_bytes"].append(f"rtml_cgroup_high_bytes{{{lab}}} {high}")
            top, bound = ceiling(snap.limit, high), binding(snap.limit, high)
            if top is not None:
                rows["rtml_cgroup_ceiling_bytes"].append(f'rtml_cgroup_ceiling_bytes{{{lab},binding="{bound}"}} {top}')
            _pressure_rows(rows, lab, state, w)
            if points and top is not None:
                rows["rtml_cgroup_threshold_bytes"].append(
                    f"rtml_cgroup_threshold_bytes{{{lab}}} {min(points) * PAGE_SIZE}")
            for kind, (charged, uncharged) in snap.growth.items():
                kl = f'{lab},kind="{kind}"'  # kinds are fixed names: nothing to escape
                rows["rtml_cgroup_charged_bytes_total"].append(f"rtml_cgroup_charged_bytes_total{{{kl}}} {charged}")
                rows["rtml_cgroup_uncharged_bytes_total"].append(
                    f"rtml_cgroup_uncharged_bytes_total{{{kl}}} {uncharged}")
            rows["rtml_cgroup_oom_kills_total"].append(f"rtml_cgroup_oom_kills_total{{{lab}}} {snap.oom_kills}")
            rows["rtml_cgroup_trips_total"].append(f"rtml_cgroup_trips_total{{{lab}}} {trips}")
            g = self.growth.get(cgid)
            rate = g.rate if g is not None else None
            if rate is not None:
                rows["rtml_cgroup_growth_bytes_per_second"].append(
                    f"rtml_cgroup_growth_bytes_per_second{{{lab}}} {rate:.6g}")
                left = seconds_to(snap.headroom, rate)
                if left is not None:
                    rows["rtml_cgroup_seconds_to_limit"].append(f"rtml_cgroup_seconds_to_limit{{{lab}}} {left:.6g}")
        out: list[str] = []
        for name, kind, text in CGROUP_FAMILIES:
            out += [f"# HELP {name} {text}", f"# TYPE {name} {kind}", *rows[name]]
        out += _health(view, self)
        out += _programs(view)
        self.scrapes += 1
        self.last_scrape_seconds = time.perf_counter() - t0
        return ("\n".join(out) + "\n").encode()


def _pressure_rows(rows: dict[str, list[str]], lab: str, state: SlotState, w: memoryview | None) -> None:
    """A cgroup's memory.pressure (a file read on the HTTP thread) and the slot's stalling bit."""
    psi, _ = read_pressure(state.cgroup)
    if psi is not None:
        for stall, avg, total in (("some", psi.some_avg10, psi.some_total_us), ("full", psi.full_avg10,
                                                                                psi.full_total_us)):
            rows["rtml_cgroup_pressure_avg10"].append(f'rtml_cgroup_pressure_avg10{{{lab},stall="{stall}"}} {avg}')
            rows["rtml_cgroup_pressure_stalled_seconds_total"].append(
                f'rtml_cgroup_pressure_stalled_seconds_total{{{lab},stall="{stall}"}} {total / 1e6:.6f}')
        flags = w[state.index * abi.SLOT_WORDS + abi.W_FLAGS] if w is not None else 0
        rows["rtml_cgroup_stalling"].append(f"rtml_cgroup_stalling{{{lab}}} {int(bool(flags & abi.SLOT_STALLING))}")


def _bpf_stats_enabled() -> bool:
    try:
        with open("/proc/sys/kernel/bpf_stats_enabled") as f:
            return f.read().strip() == "1"
    except OSError:
        return False


def _programs(view: AgentView) -> Iterable[str]:
    """Run time and runs of each attached program (kernel.bpf_stats_enabled counts them)."""
    stats = view.run_stats
    yield from (
        "# HELP rtml_agent_bpf_stats_enabled 1 while kernel.bpf_stats_enabled is on (the two series below count "
        "only then: sysctl -w kernel.bpf_stats_enabled=1).",
        "# TYPE rtml_agent_bpf_stats_enabled gauge",
        f"rtml_agent_bpf_stats_enabled {int(_bpf_stats_enabled())}",
        "# HELP rtml_agent_program_run_seconds_total Time the kernel spent in each attached program.",
        "# TYPE rtml_agent_program_run_seconds_total counter",
        *(f'rtml_agent_program_run_seconds_total{{program="{hook}"}} {ns / 1e9:.9f}'
          for hook, (ns, _) in stats.items()),
        "# HELP rtml_agent_program_runs_total Runs of each attached program.",
        "# TYPE rtml_agent_program_runs_total counter",
        *(f'rtml_agent_program_runs_total{{program="{hook}"}} {runs}' for hook, (_, runs) in stats.items()),
    )


def _health(view: AgentView, metrics: NodeMetrics) -> Iterable[str]:
    hooks = ",".join(view.hooks)
    source = view.oom_source
    yield from (
        "# HELP rtml_agent_watched_cgroups Memory cgroups the programs watch now.",
        "# TYPE rtml_agent_watched_cgroups gauge",
        f"rtml_agent_watched_cgroups {len(view.cgroups)}",
        "# HELP rtml_agent_capacity_cgroups Watched cgroups the loaded maps can hold (--max-cgroups).",
        "# TYPE rtml_agent_capacity_cgroups gauge",
        f"rtml_agent_capacity_cgroups {view.capacity}",
        "# HELP rtml_agent_clients Client connections (leases) open now.",
        "# TYPE rtml_agent_clients gauge",
        f"rtml_agent_clients {view.clients}",
        "# HELP rtml_agent_leases_total Watch requests served since start.",
        "# TYPE rtml_agent_leases_total counter",
        f"rtml_agent_leases_total {view.served}",
        "# HELP rtml_agent_errors_total Requests refused or failed since start.",
        "# TYPE rtml_agent_errors_total counter",
        f"rtml_agent_errors_total {view.errors}",
        "# HELP rtml_agent_info The agent's programs: hooks attached, whether adopted from pins.",
        "# TYPE rtml_agent_info gauge",
        f'rtml_agent_info{{hooks="{hooks}",adopted="{str(view.adopted).lower()}",'
        f'abi="{abi.ABI_VERSION}"}} 1',
        "# HELP rtml_agent_oom_events_total OOM kills seen on the node (bpf: every victim from the mark_victim "
        "hook; memory.events: rises of the watched cgroups' counters, on kernels without the hook).",
        "# TYPE rtml_agent_oom_events_total counter",
        f'rtml_agent_oom_events_total{{source="{source}"}} {view.oom_events}',
        "# HELP rtml_agent_oom_events_lost_total OOM victims the event ring had no room for.",
        "# TYPE rtml_agent_oom_events_lost_total counter",
        f"rtml_agent_oom_events_lost_total {view.oom_lost}",
        "# HELP rtml_agent_oom_events_dropped_total Records not sent to an events subscriber that was not reading.",
        "# TYPE rtml_agent_oom_events_dropped_total counter",
        f"rtml_agent_oom_events_dropped_total {view.events_dropped}",
        "# HELP rtml_agent_last_scrape_seconds Time the previous scrape took to render.",
        "# TYPE rtml_agent_last_scrape_seconds gauge",
        f"rtml_agent_last_scrape_seconds {metrics.last_scrape_seconds:.6f}",
    )
