"""Per-route estimates of what one request costs in memory, learned from measured requests,
and scaled by the request's size where its size is known.

The estimate of a route is a high quantile (default the 90th percentile) of the peak
resident growth of its last ``window`` requests: robust to the odd large request without
letting one outlier reserve the whole headroom for ever. A route is *learning* until it has
``min_samples`` measurements: admission lets learning requests in one at a time. Routes
beyond ``max_routes`` share one bucket, so an attacker that varies the path cannot grow this
table. Costs the user declares (``request_bytes=``, ``route_costs=``, ``cost_per_byte=``,
``cost=``) override learning.

Size. A route whose memory grows with its body (an upload decoded 32x, a JSON API, image work)
cannot be served by one quantile: 8% of requests 24x larger than the rest sit above the 90th
percentile. When the request's size is known (HTTP ``Content-Length``, a gRPC message's bytes)
the sample also goes into the route's *size class* (the power of two of the size, from 4 KiB;
smaller bodies are one class with unsized requests), and a sized request is estimated from its
own class. A class not learned yet is estimated from the learned ones: between two, linearly; above
the largest, along the slope of the two largest (or in proportion to size when only one is
known), and that estimate is marked ``extrapolated``: admission lets such a request run alone when
it does not fit beside others, so it is measured and its class learned, rather than refused for
ever on a guess.
"""

from __future__ import annotations

import bisect
import functools
import math
import re
import threading
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import NamedTuple, Protocol

from ..errors import ConfigError

OVERFLOW_ROUTE = "*"
SIZE_FLOOR = 4096  # bodies below this are one class with unsized requests: their cost does not scale
MAX_CLASSES = 24  # size classes per route (4 KiB .. 64 GiB); more cannot occur
# Path segments that name an instance rather than a route: numbers, UUIDs, long hex ids.
_ID_SEGMENT = re.compile(r"^(\d+|[0-9a-fA-F]{8}-[0-9a-fA-F-]{27,}|[0-9a-fA-F]{16,})$")

CostFunction = Callable[[str, "int | None"], "int | None"]


def route_key(method: str, path: str) -> str:
    """``GET /users/42/items`` -> ``GET /users/:id/items``: one estimate per route, not per URL."""
    return _route_key(method, path.split("?", 1)[0])


@functools.lru_cache(maxsize=4096)
def _route_key(method: str, path: str) -> str:
    # Every request of the integrations asks (2.8 us for "/work" with the pattern per segment, 0.1
    # from here); bounded, so URLs that vary (ids) only miss, they do not grow it.
    return f"{method} " + "/".join(":id" if _ID_SEGMENT.match(s) else s for s in path.split("/"))


def nearest_rank(ordered: list[int], q: float) -> int:
    """Nearest-rank quantile of already sorted, non-empty ``ordered``: the smallest value with
    at least a fraction ``q`` of the values at or below it."""
    return ordered[max(1, math.ceil(q * len(ordered))) - 1]


def quantile(values: list[int], q: float) -> int:
    """Nearest-rank quantile of ``values`` (non-empty, any order)."""
    return nearest_rank(sorted(values), q)


def size_class(size: int | None) -> int:
    """0 for an unknown or small body, else the bit length of the size (13 for 4-8 KiB, ...)."""
    if size is None or size < SIZE_FLOOR:
        return 0
    return min(size.bit_length(), SIZE_FLOOR.bit_length() + MAX_CLASSES - 1)


class _PyWindow:
    """The last ``n`` values, also kept sorted (bisect, no sort per sample). Where the extension
    was built, ``rtml_ebpf._hot.Window`` instead: the same contract in C (an admitted request's
    finish adds to one or three windows)."""

    __slots__ = ("values", "ordered")

    def __init__(self, n: int) -> None:
        self.values: deque[int] = deque(maxlen=n)
        self.ordered: list[int] = []

    def add(self, v: int) -> int:
        """Add ``v`` (the oldest leaves when full); how many values are held now."""
        values, ordered = self.values, self.ordered
        if len(values) == values.maxlen:
            del ordered[bisect.bisect_left(ordered, values[0])]  # the one the deque drops
        values.append(v)
        bisect.insort(ordered, v)
        return len(values)

    def rank(self, q: float) -> int:
        """The nearest-rank ``q`` quantile (0: the smallest, 1: the largest)."""
        return nearest_rank(self.ordered, q)

    def __len__(self) -> int:
        return len(self.values)


class Window(Protocol):
    def add(self, v: int) -> int: ...
    def rank(self, q: float) -> int: ...
    def __len__(self) -> int: ...


_Window: Callable[[int], Window]
try:
    from .._hot import Window as _Window
except ImportError:  # built without a compiler
    _Window = _PyWindow


class Estimate(NamedTuple):
    """Bytes to reserve for one request, and how that figure was reached (a tuple: made per
    request where not cached, and a frozen dataclass costs three times as much to make)."""

    bytes: int
    basis: str  # "declared", "route", "size" (its size class), "interpolated", "extrapolated"

    @property
    def extrapolated(self) -> bool:
        return self.basis == "extrapolated"


@dataclass(frozen=True)
class RouteEstimate:
    route: str
    estimate: int | None  # bytes for a request of unknown size; None while learning
    samples: int
    declared: bool
    by_size: tuple[tuple[int, int], ...] = ()  # (largest body of the class seen, its estimate), learned classes


class _Route:
    __slots__ = ("costs", "classes", "sizes")

    def __init__(self, window: int) -> None:
        self.costs = _Window(window)  # every request of the route, whatever its size
        self.classes: dict[int, Window] = {}  # size class -> costs
        self.sizes: dict[int, Window] = {}  # size class -> body sizes (its representative size)


class CostEstimator:
    def __init__(
        self,
        *,
        request_bytes: int | None = None,
        route_costs: Mapping[str, int] | None = None,
        cost_per_byte: float | Mapping[str, float] | None = None,
        cost: CostFunction | None = None,
        quantile: float = 0.9,
        window: int = 32,
        min_samples: int = 3,
        max_routes: int = 256,
    ) -> None:
        if request_bytes is not None and (isinstance(request_bytes, bool) or not isinstance(request_bytes, int)
                                          or request_bytes < 0):
            raise ConfigError(f"request_bytes={request_bytes!r}: pass the bytes one request may use (int >= 0)")
        declared = dict(route_costs or {})
        for route, c in declared.items():
            if not isinstance(route, str) or isinstance(c, bool) or not isinstance(c, int) or c < 0:
                raise ConfigError(f"route_costs[{route!r}]={c!r}: pass 'METHOD /path': bytes (int >= 0)")
        self.per_byte = self._check_per_byte(cost_per_byte)
        if cost is not None and not callable(cost):
            raise ConfigError(f"cost={cost!r}: pass a function (route, body bytes or None) -> bytes or None")
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
        self.cost_function = cost
        self.q = float(quantile)
        self.window = window
        self.min_samples = min_samples
        self.max_routes = max_routes
        self._routes: OrderedDict[str, _Route] = OrderedDict()
        self._estimates: dict[str, int] = {}  # route -> learned estimate for a request of unknown size
        self._learned: dict[str, Estimate] = {}  # the same, made once per change (read per request)
        # Declared costs that do not depend on the size: made once, not per request.
        self._fixed: dict[str, Estimate] | None = None
        if cost is None and self.per_byte is None:
            self._fixed = {r: Estimate(c, "declared") for r, c in declared.items()}
        self._default = None if request_bytes is None else Estimate(request_bytes, "declared")
        self._class_estimates: dict[str, dict[int, tuple[int, int]]] = {}  # route -> class -> (size, bytes)
        self._lock = threading.Lock()
        # The largest estimate known, kept current by observe(): admission reads it per request
        # (an attribute, not a call). per_kib_bytes: see per_kib().
        self._declared_largest = max([*declared.values(), request_bytes or 0], default=0)
        self.largest_bytes = self._declared_largest
        self.per_kib_bytes = 0

    @staticmethod
    def _check_per_byte(value: object) -> dict[str, float] | float | None:
        def ok(x: object) -> bool:
            return not isinstance(x, bool) and isinstance(x, (int, float)) and math.isfinite(x) and x >= 0

        if value is None:
            return None
        if isinstance(value, Mapping):
            for route, x in value.items():
                if not isinstance(route, str) or not ok(x):
                    raise ConfigError(f"cost_per_byte[{route!r}]={x!r}: pass 'METHOD /path': bytes per body byte "
                                      "(a number >= 0)")
            return {r: float(x) for r, x in value.items()}
        if not ok(value):
            raise ConfigError(f"cost_per_byte={value!r}: pass bytes of memory per body byte (a number >= 0), "
                              "or a mapping 'METHOD /path': number")
        return float(value)  # type: ignore[arg-type]

    def _bucket(self, route: str) -> str:
        if route in self._routes or len(self._routes) < self.max_routes:
            return route
        return OVERFLOW_ROUTE

    # -- estimates --------------------------------------------------------------------------
    def estimate(self, route: str, size: int | None = None) -> int | None:
        """Bytes to reserve for one request of ``route`` (with a body of ``size`` bytes, when
        known); None while the route is learning."""
        e = self.estimate_for(route, size)
        return None if e is None else e.bytes

    def estimate_for(self, route: str, size: int | None = None) -> Estimate | None:
        fixed = self._fixed
        if fixed is not None:
            e = fixed.get(route, self._default)
            if e is not None:
                return e
            if size is None or size < SIZE_FLOOR:  # a learned route, by its size-free figure
                return self._learned.get(route if route in self._routes or len(self._routes) < self.max_routes
                                         else OVERFLOW_ROUTE)
        if self.cost_function is not None:
            declared = self.cost_function(route, size)
            if declared is not None:
                return Estimate(max(0, int(declared)), "declared")
        per_byte = self.per_byte.get(route) if isinstance(self.per_byte, dict) else self.per_byte
        base = self.declared.get(route, self.request_bytes)
        if per_byte is not None and size is not None:
            return Estimate((base or 0) + int(per_byte * size), "declared")
        if base is not None:
            return Estimate(base, "declared")
        bucket = route if route in self._routes or len(self._routes) < self.max_routes else OVERFLOW_ROUTE
        cls = size_class(size)
        if cls:
            by_class = self._class_estimates.get(bucket)
            if by_class:
                return self._from_classes(by_class, cls, size or 0)
        est = self._estimates.get(bucket)
        return None if est is None else Estimate(est, "route")

    @staticmethod
    def _from_classes(by_class: dict[int, tuple[int, int]], cls: int, size: int) -> Estimate:
        own = by_class.get(cls)
        if own is not None:
            return Estimate(own[1], "size")
        below = sorted((c, v) for c, v in by_class.items() if c < cls)
        above = sorted((c, v) for c, v in by_class.items() if c > cls)
        if below and above:
            (s0, e0), (s1, e1) = below[-1][1], above[0][1]
            if s1 <= s0:
                return Estimate(max(e0, e1), "interpolated")
            at = e0 + (e1 - e0) * (size - s0) / (s1 - s0)
            return Estimate(int(min(max(e0, e1), max(min(e0, e1), at))), "interpolated")
        if above:
            return Estimate(above[0][1][1], "interpolated")  # smaller than any learned: at most the next one
        s0, e0 = below[-1][1]
        if len(below) >= 2:
            s1, e1 = below[-2][1]
            slope = max(0.0, (e0 - e1) / (s0 - s1)) if s0 > s1 else e0 / max(s0, 1)
        else:
            slope = e0 / max(s0, 1)  # one class known: in proportion to size, the cautious guess
        return Estimate(int(e0 + slope * max(0, size - s0)), "extrapolated")

    def largest(self) -> int:
        """The largest estimate known for any route (declared or learned), 0 when none."""
        return self.largest_bytes

    def per_kib(self) -> int:
        """The largest learned cost per KiB of body of any size class (0: none learned): what a
        process that has not learned a sized route yet scales a request's size by."""
        return self.per_kib_bytes

    def scaled(self, size: int | None, per_kib: int) -> Estimate | None:
        """A sized request of a route not learned here, from the cgroup's per-KiB figure: a
        guess, so marked extrapolated (it may run alone; the enforcer backs it)."""
        if size is None or size < SIZE_FLOOR or per_kib <= 0:
            return None
        return Estimate(per_kib * size // 1024, "extrapolated")

    # -- learning ---------------------------------------------------------------------------
    def observe(self, route: str, cost: int, size: int | None = None, floor: bool = False) -> None:
        """One finished request's measured peak growth in bytes (and its body size, if known).
        ``floor``: the request was ended before it finished, so its cost is a lower bound: it is
        added only where it is not below the current estimate (it raises one, never lowers it)."""
        # Per finished request (the request path): no call that can be an expression.
        cost = int(cost) if cost > 0 else 0
        cls = 0 if size is None else size_class(size)
        with self._lock:
            routes = self._routes
            r = routes.get(route)
            if r is not None and not cls and not floor:
                # The common case, a route seen before and no size class: its window, and the
                # rest only when its estimate moved. (A floor, from an ended request, is rare: below.)
                if r.costs.add(cost) < self.min_samples:
                    return
                new = r.costs.rank(self.q)
                old = self._estimates.get(route, 0)
                if new != old or route not in self._learned:
                    self._estimates[route] = new
                    self._learned[route] = Estimate(new, "route")
                    self._moved(old, new)
                return
            bucket = route
            if r is None:
                bucket = route if len(routes) < self.max_routes else OVERFLOW_ROUTE
                r = routes.get(bucket)
                if r is None:
                    r = routes[bucket] = _Route(self.window)
            changed: list[tuple[int, int]] = []  # (old, new) of every estimate this sample moved
            # A sample at or above a quantile cannot lower it, even with the window's oldest leaving.
            if not (floor and cost < self._estimates.get(bucket, 0)) and r.costs.add(cost) >= self.min_samples:
                old = self._estimates.get(bucket, 0)
                new = self._estimates[bucket] = r.costs.rank(self.q)
                if new != old or bucket not in self._learned:
                    self._learned[bucket] = Estimate(new, "route")
                    changed.append((old, new))
            if cls:
                costs = r.classes.get(cls)
                if costs is None:
                    costs = r.classes[cls] = _Window(self.window)
                    r.sizes[cls] = _Window(self.window)
                sizes = r.sizes[cls]
                below = floor and cost < self._class_estimates.get(bucket, {}).get(cls, (0, 0))[1]
                if not below:
                    sizes.add(size or 0)
                if not below and costs.add(cost) >= self.min_samples:
                    by_class = self._class_estimates.setdefault(bucket, {})
                    old = by_class.get(cls, (0, 0))[1]
                    new = costs.rank(self.q)
                    by_class[cls] = (sizes.rank(1.0), new)
                    changed.append((old, new))
                    self.per_kib_bytes = max(self.per_kib_bytes, new * 1024 // max(sizes.rank(0.0), SIZE_FLOOR))
            for old, new in changed:
                self._moved(old, new)

    def _moved(self, old: int, new: int) -> None:
        """An estimate moved from ``old`` to ``new``: the largest known follows (lock held)."""
        if new >= self.largest_bytes:
            self.largest_bytes = new
        elif old == self.largest_bytes:  # the largest one shrank: find the new largest
            self.largest_bytes = max(self._declared_largest, *self._estimates.values(),
                                     *(e for c in self._class_estimates.values() for _, e in c.values()))

    def routes(self) -> list[RouteEstimate]:
        with self._lock:
            out = [RouteEstimate(r, self._estimates.get(r), len(s.costs), False,
                                 tuple(v for _, v in sorted(self._class_estimates.get(r, {}).items())))
                   for r, s in self._routes.items()]
        out += [RouteEstimate(r, c, 0, True) for r, c in self.declared.items()]
        return out
