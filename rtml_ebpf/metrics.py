"""Prometheus metrics, read live at scrape time (extra: rtml-ebpf[prometheus]).

    from prometheus_client import start_http_server
    from rtml_ebpf.metrics import MemoryLimiterCollector
    MemoryLimiterCollector()          # the process default limiter, default registry
    start_http_server(9100)

Nothing registers on import; ``registry=None`` builds a collector without registering it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client.core import REGISTRY, CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily
from prometheus_client.registry import CollectorRegistry

from .admission.policy import ended, rejections
from .errors import ConfigError
from .limiter import Level, Limiter

LEVELS = {lvl.name: int(lvl) for lvl in Level}


class MemoryLimiterCollector:
    """Yields the limiter's reading as metric families at each scrape.

    Names (prefix ``rtml_`` by default): memory_usage_bytes, memory_working_set_bytes,
    memory_limit_bytes (absent when unlimited), memory_threshold_bytes{level},
    memory_level (0 OK, 1 SOFT, 2 HARD), memory_trips_total{level}, rejections_total{integration},
    requests_ended_total{integration}, relief_runs_total, relief_bytes_total, oom_kills_total,
    backend_info. Every family but rejections_total and requests_ended_total carries a ``cgroup``
    label.
    """

    def __init__(
        self, limiter: Limiter | None = None, *, registry: CollectorRegistry | None = REGISTRY,
        namespace: str = "rtml",
    ) -> None:
        if limiter is not None and not isinstance(limiter, Limiter):
            raise ConfigError(f"limiter={limiter!r}: pass a rtml_ebpf.Limiter, or None for the process default")
        self._limiter = limiter
        self._ns = namespace
        if registry is not None:
            registry.register(self)

    def _lim(self) -> Limiter:
        if self._limiter is not None:
            return self._limiter
        from ._default import default_limiter

        return default_limiter()

    def describe(self) -> Iterator[Any]:
        # Names only, so registering does not build the default limiter.
        return iter(self._families({}, with_values=False))

    def collect(self) -> Iterator[Any]:
        return iter(self._families(self._lim().stats().as_dict(), with_values=True))

    def _families(self, s: dict[str, Any], *, with_values: bool) -> list[Any]:
        n = self._ns
        cg = [s.get("cgroup_dir", "")]
        fams: list[Any] = []

        def gauge(name: str, doc: str, value: float | None, labels: tuple[str, ...] = ("cgroup",),
                  label_values: list[str] | None = None) -> GaugeMetricFamily:
            g = GaugeMetricFamily(f"{n}_{name}", doc, labels=list(labels))
            if with_values and value is not None:
                g.add_metric(label_values or cg, value)
            fams.append(g)
            return g

        gauge("memory_usage_bytes", "The cgroup's memory usage (the kernel's page counter).", s.get("usage_bytes"))
        gauge("memory_working_set_bytes", "Usage minus inactive file cache (what kubelet evicts on).",
              s.get("working_set_bytes"))
        gauge("memory_limit_bytes", "The effective limit: the tightest on the path to the root.",
              s.get("limit_bytes"))
        th = gauge("memory_threshold_bytes", "Where each level trips.", None, ("cgroup", "level"))
        if with_values:
            if s.get("threshold_bytes") is not None:
                th.add_metric([cg[0], "hard"], s["threshold_bytes"])
            if s.get("soft_threshold_bytes") is not None:
                th.add_metric([cg[0], "soft"], s["soft_threshold_bytes"])
        gauge("memory_level", "0 OK, 1 SOFT, 2 HARD.", LEVELS.get(s.get("level", "OK"), 0) if with_values else None)
        trips = CounterMetricFamily(f"{n}_memory_trips", "Times a level went from clear to tripped.",
                                    labels=["cgroup", "level"])
        if with_values:
            trips.add_metric([cg[0], "hard"], s.get("trips", 0))
            trips.add_metric([cg[0], "soft"], s.get("soft_trips", 0))
        fams.append(trips)
        rej = CounterMetricFamily(f"{n}_rejections", "Requests rejected for memory, by integration.",
                                  labels=["integration"])
        if with_values:
            for integration, count in sorted(rejections().items()):
                rej.add_metric([integration], count)
        fams.append(rej)
        ended_family = CounterMetricFamily(
            f"{n}_requests_ended", "Admitted requests ended for memory (they overran), by integration.",
            labels=["integration"])
        if with_values:
            for integration, count in sorted(ended().items()):
                ended_family.add_metric([integration], count)
        fams.append(ended_family)
        for name, doc, key in (
            ("relief_runs", "gc.collect + malloc_trim runs after a trip.", "relief_runs"),
            ("relief_bytes", "Resident bytes the relief runs handed back.", "relief_bytes"),
            ("oom_kills", "OOM kills in the cgroup (eBPF: since watched; poll: the cgroup counter).", "oom_kills"),
        ):
            c = CounterMetricFamily(f"{n}_{name}", doc, labels=["cgroup"])
            if with_values:
                c.add_metric(cg, s.get(key, 0))
            fams.append(c)
        info = InfoMetricFamily(f"{n}_backend", "The backend in use and why.", labels=["cgroup"])
        if with_values:
            info.add_metric(cg, {"backend": s.get("backend", ""), "hooks": ",".join(s.get("hooks", ())),
                                 "reason": s.get("backend_reason", ""), "metric": s.get("metric", "")})
        fams.append(info)
        return fams
