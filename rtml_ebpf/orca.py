"""Load reports to the balancer (ORCA) and Retry-After from the measured drain rate.

Envoy's and gRPC's client-side weighted round robin weigh each endpoint by
``rps_fractional / application_utilization`` (cpu_utilization when the application one is
unset) from the ORCA load reports its responses carry. The middlewares and interceptors
send one per response when ``load_report`` is set (see docs/load-reports.md):

- ``mem_utilization``: the cgroup's usage over its effective limit (0..1);
- ``application_utilization``: the limiter's metric over its hard threshold, so 1.0 is where
  it sheds; above 1.0 while over (the field allows it);
- ``rps_fractional``: requests per second through this middleware, in this process.

HTTP: the response header ``endpoint-load-metrics`` in the TEXT
(``TEXT mem_utilization=0.5, ...``) or JSON (``JSON {...}``) form. gRPC: per-call trailing
metadata, ``endpoint-load-metrics-bin`` (a serialized xds.data.orca.v3.OrcaLoadReport, what
gRPC's clients read) by default, or the text/JSON header forms.

The figures come from Limiter.stats() (file reads), so one reading serves every response of
the next REFRESH_S seconds. Nothing here raises into a request: a limiter that cannot be read
sends no report and the default Retry-After.
"""

from __future__ import annotations

import json
import math
import random
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from .errors import ConfigError
from .limiter import Limiter, Stats

HEADER = "endpoint-load-metrics"
HEADER_BIN = "endpoint-load-metrics-bin"
HTTP_FORMATS = ("text", "json")
GRPC_FORMATS = ("bin", "text", "json")
REFRESH_S = 0.1  # a reading serves the responses of this long
RPS_WINDOW_S = 1.0  # requests are counted over windows of at least this long
# Below this drain the rate is noise (the page counter moves in per-CPU batches): no estimate.
DRAIN_MIN_BYTES_PER_S = 256 * 1024
RETRY_AFTER_MAX_S = 60  # a derived Retry-After is never longer than this

# xds.data.orca.v3.OrcaLoadReport field numbers (all doubles: wire type 1, fixed64).
_FIELDS = {"mem_utilization": 2, "rps_fractional": 6, "application_utilization": 9}


@dataclass(frozen=True)
class Load:
    """One reading for the balancer; None: not known (no limit, or no window yet)."""

    mem_utilization: float | None
    application_utilization: float | None
    rps_fractional: float | None
    drain_s: float | None  # seconds until back under the threshold at the current drain rate

    def fields(self) -> dict[str, float]:
        return {name: v for name in ("mem_utilization", "application_utilization", "rps_fractional")
                if (v := getattr(self, name)) is not None}


def load_from_stats(st: Stats, rps: float | None) -> Load:
    value = st.working_set_bytes if st.metric == "working_set" else st.usage_bytes
    mem = None if not st.limit_bytes else min(1.0, max(0.0, st.usage_bytes / st.limit_bytes))
    app = None if not st.threshold_bytes else max(0.0, value / st.threshold_bytes)
    drain = None
    rate = st.growth_bytes_per_s
    if st.headroom_bytes is not None and st.headroom_bytes < 0 and rate is not None and rate <= -DRAIN_MIN_BYTES_PER_S:
        drain = st.headroom_bytes / rate  # both negative: seconds until the metric is back under
    return Load(mem, app, rps, drain)


def _num(v: float) -> str:
    # Plain decimals (no exponent, no NaN/inf): what every ORCA parser reads as a double.
    return f"{v:.4f}".rstrip("0").rstrip(".") or "0"


def text_form(load: Load) -> str:
    return "TEXT " + ", ".join(f"{k}={_num(v)}" for k, v in load.fields().items())


def json_form(load: Load) -> str:
    return "JSON " + json.dumps({k: round(v, 4) for k, v in load.fields().items()}, separators=(",", ":"))


def binary_form(load: Load) -> bytes:
    """The OrcaLoadReport protobuf: each set field as its tag and a little-endian double."""
    out = bytearray()
    for name, v in sorted(load.fields().items(), key=lambda kv: _FIELDS[kv[0]]):
        out += bytes([_FIELDS[name] << 3 | 1]) + struct.pack("<d", v)
    return bytes(out)


def check_format(load_report: object, formats: tuple[str, ...], default: str) -> str | None:
    """The integrations' ``load_report=`` argument: None/False (off), True (``default``) or a form."""
    if load_report is None or load_report is False:
        return None
    if load_report is True:
        return default
    if load_report not in formats:
        raise ConfigError(f"load_report={load_report!r}: use None (off), True, or one of "
                          f"{', '.join(map(repr, formats))}")
    return str(load_report)


class LoadReporter:
    """Per integration: counts requests, reads the limiter at most every REFRESH_S, and
    answers the report header and the Retry-After of a rejection."""

    def __init__(self, limiter: Limiter | None, fmt: str | None) -> None:
        self.limiter = limiter
        self.fmt = fmt
        self._lock = threading.Lock()
        self._next_read = 0.0
        self._load: Load | None = None
        self._count = 0
        self._window_start = time.monotonic()
        self._rps: float | None = None

    def count(self) -> None:
        # An estimate for the balancer: an increment lost to a race between threads is harmless.
        self._count += 1

    def _limiter(self) -> Limiter | None:
        if self.limiter is not None:
            return self.limiter
        from . import _default

        try:
            return _default.default_limiter()
        except Exception:  # noqa: BLE001 - the default limiter logged why; no report then
            return None

    def reading(self) -> Load | None:
        now = time.monotonic()
        if now < self._next_read:
            return self._load
        with self._lock:
            if now < self._next_read:
                return self._load
            self._next_read = now + REFRESH_S
            span = now - self._window_start
            if span >= RPS_WINDOW_S:
                self._rps, self._count, self._window_start = self._count / span, 0, now
            lim = self._limiter()
            try:
                self._load = None if lim is None else load_from_stats(lim.stats(), self._rps)
            except Exception:  # noqa: BLE001 - closed or removed cgroup: report nothing
                self._load = None
            return self._load

    def header(self) -> tuple[str, str | bytes] | None:
        """(name, value) of this response's load report, or None (off, or nothing known)."""
        if self.fmt is None:
            return None
        load = self.reading()
        if load is None or not load.fields():
            return None
        if self.fmt == "bin":
            return HEADER_BIN, binary_form(load)
        return HEADER, text_form(load) if self.fmt == "text" else json_form(load)

    def retry_after(self, default: Callable[[], int]) -> int:
        """Seconds for Retry-After: while the limiter is over its threshold and draining, the
        time back under it at the measured rate (rounded up, up to 20% later so rejected
        clients do not all return at once, at most RETRY_AFTER_MAX_S); else ``default()``."""
        load = self.reading()
        if load is None or load.drain_s is None:
            return default()
        return min(RETRY_AFTER_MAX_S, max(1, math.ceil(load.drain_s * random.uniform(1.0, 1.2))))
