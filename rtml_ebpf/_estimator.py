"""Per-route estimates of what one request costs in memory, learned from measured requests.

The estimate of a route is a high quantile (default the 90th percentile) of the peak
resident growth of its last ``window`` requests: robust to the odd large request without
letting one outlier reserve the whole headroom for ever. A route is *learning* until it has
``min_samples`` measurements: admission lets learning requests in one at a time. Routes
beyond ``max_routes`` share one bucket, so an attacker that varies the path cannot grow this
table. Costs the user declares (``request_bytes=``, ``route_costs=``) override learning.
"""

from __future__ import annotations

import bisect
import math
import re
import threading
from collections import OrderedDict, deque
from collections.abc import Mapping
from dataclasses import dataclass

from .errors import ConfigError

OVERFLOW_ROUTE = "*"
# Path segments that name an instance rather than a route: numbers, UUIDs, long hex ids.
_ID_SEGMENT = re.compile(r"^(\d+|[0-9a-fA-F]{8}-[0-9a-fA-F-]{27,}|[0-9a-fA-F]{16,})$")


def route_key(method: str, path: str) -> str:
    """``GET /users/42/items`` -> ``GET /users/:id/items``: one estimate per route, not per URL."""
    segments = path.split("?", 1)[0].split("/")
    return f"{method} " + "/".join(":id" if _ID_SEGMENT.match(s) else s for s in segments)


def nearest_rank(ordered: list[int], q: float) -> int:
    """Nearest-rank quantile of already sorted, non-empty ``ordered``: the smallest value with
    at least a fraction ``q`` of the values at or below it."""
    return ordered[max(1, math.ceil(q * len(ordered))) - 1]


def quantile(values: list[int], q: float) -> int:
    """Nearest-rank quantile of ``values`` (non-empty, any order)."""
    return nearest_rank(sorted(values), q)


@dataclass(frozen=True)
class RouteEstimate:
    route: str
    estimate: int | None  # bytes; None while learning
    samples: int
    declared: bool


class CostEstimator:
    def __init__(
        self,
        *,
        request_bytes: int | None = None,
        route_costs: Mapping[str, int] | None = None,
        quantile: float = 0.9,
        window: int = 32,
        min_samples: int = 3,
        max_routes: int = 256,
    ) -> None:
        if request_bytes is not None and (isinstance(request_bytes, bool) or not isinstance(request_bytes, int)
                                          or request_bytes < 0):
            raise ConfigError(f"request_bytes={request_bytes!r}: pass the bytes one request may use (int >= 0)")
        declared = dict(route_costs or {})
        for route, cost in declared.items():
            if not isinstance(route, str) or isinstance(cost, bool) or not isinstance(cost, int) or cost < 0:
                raise ConfigError(f"route_costs[{route!r}]={cost!r}: pass 'METHOD /path': bytes (int >= 0)")
        if isinstance(quantile, bool) or not isinstance(quantile, (int, float)) or not 0 < quantile <= 1:
            raise ConfigError(f"quantile={quantile!r}: pass a fraction in (0, 1], e.g. 0.9")
        for name, value, low in (("window", window, 1), ("min_samples", min_samples, 1),
                                 ("max_routes", max_routes, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"{name}={value!r}: pass a whole number >= {low}")
        if min_samples > window:
            raise ConfigError(f"min_samples={min_samples} must not exceed window={window}")
        self.request_bytes = request_bytes
        self.declared = declared
        self.q = float(quantile)
        self.window = window
        self.min_samples = min_samples
        self.max_routes = max_routes
        self._samples: OrderedDict[str, deque[int]] = OrderedDict()
        self._sorted: dict[str, list[int]] = {}  # each route's window, kept sorted (bisect, no sort)
        self._estimates: dict[str, int] = {}
        self._lock = threading.Lock()
        # The largest estimate known, kept current by observe(): admission reads it per request.
        self._declared_largest = max([*declared.values(), request_bytes or 0], default=0)
        self._largest = self._declared_largest

    def _bucket(self, route: str) -> str:
        if route in self._samples or len(self._samples) < self.max_routes:
            return route
        return OVERFLOW_ROUTE

    def estimate(self, route: str) -> int | None:
        """Bytes to reserve for one request of ``route``; None while the route is learning."""
        if route in self.declared:
            return self.declared[route]
        if self.request_bytes is not None:
            return self.request_bytes
        est = self._estimates.get(route)
        if est is None and route not in self._samples and len(self._samples) >= self.max_routes:
            est = self._estimates.get(OVERFLOW_ROUTE)
        return est

    def largest(self) -> int:
        """The largest estimate known for any route (declared or learned), 0 when none."""
        return self._largest

    def observe(self, route: str, cost: int) -> None:
        """One finished request's measured peak growth in bytes."""
        cost = max(0, int(cost))
        with self._lock:
            bucket = self._bucket(route)
            samples = self._samples.get(bucket)
            if samples is None:
                samples = self._samples[bucket] = deque(maxlen=self.window)
                self._sorted[bucket] = []
            ordered = self._sorted[bucket]
            if len(samples) == self.window:
                del ordered[bisect.bisect_left(ordered, samples[0])]  # the sample the deque drops
            samples.append(cost)
            bisect.insort(ordered, cost)
            if len(samples) >= self.min_samples:
                old = self._estimates.get(bucket, 0)
                new = self._estimates[bucket] = nearest_rank(ordered, self.q)
                if new >= self._largest:
                    self._largest = new
                elif old == self._largest:  # the largest one shrank: find the new largest
                    self._largest = max(self._declared_largest, *self._estimates.values())

    def routes(self) -> list[RouteEstimate]:
        with self._lock:
            out = [RouteEstimate(r, self._estimates.get(r), len(s), False) for r, s in self._samples.items()]
        out += [RouteEstimate(r, c, 0, True) for r, c in self.declared.items()]
        return out
