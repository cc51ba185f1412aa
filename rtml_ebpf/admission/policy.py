"""The shedding decision every integration shares: which limiter, which level, which paths
are never shed, budget admission (on by default), the jittered Retry-After, and the count of
rejections by integration."""

from __future__ import annotations

import random
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING

from .. import _cgroup
from ..config import env_hooks, env_settings
from ..errors import ConfigError, RtmlError
from ..limiter import Level, Limiter

# Health, readiness and metrics endpoints must answer while the service sheds: an orchestrator
# that sees them fail restarts the pod, and a scraper that sees them fail loses the spike.
DEFAULT_EXCLUDE_PATHS = ("/health", "/healthz", "/ready", "/readyz", "/live", "/livez", "/metrics")
SHED_AT = ("hard", "soft", "probabilistic", "stall")
REJECTION_BODY = b"memory limit reached, retry later\n"
TOO_LARGE_BODY = (b"request too large for this service's memory limit: the memory its declared size is estimated "
                  b"to need exceeds what the service has ever had free; retrying will not help\n")
ENDED_BODY = b"memory limit reached: this request was ended to keep the service from being OOM-killed, retry later\n"
MAX_CONTENT_LENGTH_DIGITS = 18

if TYPE_CHECKING:
    from .budget import Admission
    from .ticket import Ticket

_rejections: Counter[str] = Counter()
_rejections_lock = threading.Lock()


def rejections() -> dict[str, int]:
    """Requests rejected so far in this process, by integration name."""
    with _rejections_lock:
        return dict(_rejections)


def record_rejection(integration: str) -> None:
    with _rejections_lock:
        _rejections[integration] += 1


_ended: Counter[str] = Counter()


def ended() -> dict[str, int]:
    """Requests the enforcer ended so far in this process, by integration name."""
    with _rejections_lock:
        return dict(_ended)


def record_ended(integration: str) -> None:
    with _rejections_lock:
        _ended[integration] += 1


def content_length(value: str | bytes | None) -> int | None:
    """A Content-Length header's bytes, or None when absent or not a plain decimal number (a
    hostile value must not become an estimate)."""
    if value is None:
        return None
    text = value.decode("latin-1") if isinstance(value, bytes) else value
    text = text.strip()
    if not text.isascii() or not text.isdigit() or len(text) > MAX_CONTENT_LENGTH_DIGITS:
        return None
    return int(text)


def _check_stall(limiter: Limiter | None) -> None:
    """shed_at="stall" needs the cgroup's memory.pressure (cgroup v2 with PSI): refuse it where
    the signal does not exist rather than never shed on it."""
    from .._psi import read_pressure

    try:
        cgroup = limiter.cgroup if limiter is not None else _cgroup.find_process_cgroup()
    except RtmlError as exc:
        raise ConfigError(f"shed_at='stall': {exc}") from None
    psi, why = read_pressure(cgroup)
    if psi is None:
        raise ConfigError(f"shed_at='stall' needs memory pressure (PSI) of {cgroup.directory}: {why}; "
                          "use shed_at='hard' or 'soft' here")


class Policy:
    """Validated once at construction; per request it is a path lookup and one check."""

    def __init__(
        self,
        integration: str,
        limiter: Limiter | None,
        *,
        shed_at: str = "hard",
        exclude: Iterable[str] = DEFAULT_EXCLUDE_PATHS,
        retry_after: tuple[int, int] = (1, 5),
        admission: bool | Admission = True,
        request_bytes: int | None = None,
        route_costs: Mapping[str, int] | None = None,
        cost_per_byte: float | Mapping[str, float] | None = None,
    ) -> None:
        if limiter is not None and not isinstance(limiter, Limiter):
            raise ConfigError(f"limiter={limiter!r}: pass a rtml_ebpf.Limiter, or None for the process default")
        if limiter is None:
            # The process default is built from RTML_*. The module-level check fails open on a bad
            # value (logged once), by contract; an integration that did the same ran its service
            # unguarded from a typo (RTML_THRESHOLD=90 read as 90 bytes: every request admitted,
            # OOM kills as with no guard). Here it is the service's ConfigError, at start.
            env_settings()
            env_hooks()
        if shed_at not in SHED_AT:
            raise ConfigError(f"shed_at={shed_at!r}: use one of {', '.join(map(repr, SHED_AT))}")
        if shed_at == "stall":
            _check_stall(limiter)
        if isinstance(exclude, str):
            raise ConfigError(f"exclude={exclude!r}: pass a list of paths, not one string")
        exclude = tuple(exclude)
        for p in exclude:
            if not isinstance(p, str) or not p.startswith("/") or "*" in p[:-1]:
                raise ConfigError(f"exclude_paths: {p!r}: pass paths starting with '/', matched exactly; end one "
                                  "with '/*' to exclude everything under it")
        lo, hi = retry_after
        if not (isinstance(lo, int) and isinstance(hi, int) and 0 <= lo <= hi):
            raise ConfigError(f"retry_after={retry_after!r}: pass (min, max) whole seconds, 0 <= min <= max")
        self.integration = integration
        self.limiter = limiter
        # Exact matches: a prefix would exclude routes that only share the name (/live/report
        # under /live). "/api/*" excludes /api and everything under /api/.
        self.exclude = frozenset(p[:-2] or "/" if p.endswith("/*") else p for p in exclude)
        self._prefixes = tuple(p[:-1] for p in exclude if p.endswith("/*"))
        self.retry_after = (lo, hi)
        self.shed_at = shed_at
        self._decide = self._make_decider()
        self.admission = make_admission(admission, limiter, request_bytes, route_costs, cost_per_byte)
        if limiter is None and self.admission is not None:
            from .. import _default

            _default.prepare()  # a server's middleware: load once here, workers forked after inherit it

    def _make_decider(self) -> Callable[[], bool]:
        lim = self.limiter
        if lim is None:
            from .. import _default

            if self.shed_at == "hard":
                return _default.is_mem_limit_reached  # builds the default lazily, never raises
            stall_meter = None
            if self.shed_at == "stall":
                from .._stall import StallMeter

                stall_meter = StallMeter(_cgroup.find_process_cgroup())

            def default_decider() -> bool:
                if _default.is_mem_limit_reached():
                    return True
                try:
                    d = _default.default_limiter()
                except Exception:  # noqa: BLE001 - the module check already logged and failed open
                    return False
                if stall_meter is not None:
                    return stall_meter.stalling()
                return d.level() >= Level.SOFT if self.shed_at == "soft" else d.should_shed()

            return default_decider
        if self.shed_at == "hard":
            return lim.is_mem_limit_reached
        if self.shed_at == "stall":
            hard, stalling = lim.is_mem_limit_reached, lim.stalling
            return lambda: hard() or stalling()
        if self.shed_at == "soft":
            return lambda: lim.level() >= Level.SOFT
        return lim.should_shed

    def door(self) -> bool:
        """The check at the door alone: True to shed (not counted: the caller counts what it
        rejects). With admission at the hard level the admission makes that check itself."""
        if self.admission is not None and self.shed_at == "hard":
            return False
        return self._decide()

    def admit(self, path: str, route: str, *, size: int | None = None, stepped: bool = False,
              bind: bool = True, body: bool = False) -> tuple[bool, Ticket | None]:
        """Every integration's decision for one request: (shed?, ticket). Excluded paths pass
        with no ticket; the door check and the budget (when admission is on) may shed, and a
        shed request is counted. ``size``: the body's bytes when known (the estimate scales
        with it); ``body``: the body is still to be read and the integration reports it
        (Admission.body_read/body_done). A ticket must be finished with ``self.admission.finish``."""
        if self.excluded(path):
            return False, None
        if self.door():
            record_rejection(self.integration)
            return True, None
        if self.admission is None:
            return False, None
        ticket = self.admission.try_admit(route, size=size, stepped=stepped, bind=bind, body=body)
        if ticket is None:
            record_rejection(self.integration)
            return True, None
        return False, ticket

    def excluded(self, path: str) -> bool:
        return path in self.exclude or (bool(self._prefixes) and path.startswith(self._prefixes))

    def rejection_body(self, ticket: Ticket | None = None) -> bytes:
        """The 503's body for a request this thread's admission just refused (or ``ticket``, refused
        as its body grew): a declared size that can never fit says so."""
        adm = self.admission
        return TOO_LARGE_BODY if adm is not None and adm.refusal() == "too_large" else REJECTION_BODY

    def should_shed(self, path: str = "") -> bool:
        if path and self.excluded(path):
            return False
        if self._decide():
            record_rejection(self.integration)
            return True
        return False

    def retry_after_seconds(self) -> int:
        # Jitter spreads the retries of many rejected clients over the window.
        lo, hi = self.retry_after
        return random.randint(lo, hi)


def make_admission(
    admission: object, limiter: Limiter | None, request_bytes: int | None, route_costs: Mapping[str, int] | None,
    cost_per_byte: float | Mapping[str, float] | None = None,
) -> Admission | None:
    """The integrations' ``admission=`` argument: True (default) builds one for ``limiter``,
    False turns budgeting off (the check at the door only), or pass an Admission to share."""
    from .budget import Admission

    declared = request_bytes is not None or route_costs is not None or cost_per_byte is not None
    if isinstance(admission, Admission):
        if declared:
            raise ConfigError("request_bytes/route_costs/cost_per_byte: set them on the Admission you pass, "
                              "not beside it")
        return admission
    if admission is False:
        if declared:
            raise ConfigError("request_bytes/route_costs/cost_per_byte need admission=True")
        return None
    if admission is True:
        return Admission(limiter, request_bytes=request_bytes, route_costs=route_costs, cost_per_byte=cost_per_byte)
    raise ConfigError(f"admission={admission!r}: pass True (default), False or a rtml_ebpf.Admission")
