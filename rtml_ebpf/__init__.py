"""rtml-ebpf: a real-time memory limit check for Python services, fed by the kernel.

    import rtml_ebpf
    if rtml_ebpf.is_mem_limit_reached():
        return 503

The process-wide default limiter watches this process's memory cgroup. Its
settings come from the environment (RTML_THRESHOLD, RTML_METRIC, RTML_BACKEND,
RTML_FAIL_CLOSED) or from :func:`configure` (see rtml_ebpf._default).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._default import configure, default_limiter, is_mem_limit_reached
from ._guard import guard, wait_for_headroom
from .config import parse_threshold, parse_threshold_text
from .errors import (
    CapacityError,
    CgroupNotFound,
    ConfigError,
    LoadError,
    MemoryLimitReached,
    NotSupported,
    PermissionDenied,
    RequestMemoryExceeded,
    RtmlError,
)
from .limiter import Level, Limiter, Stats

__all__ = [
    "Admission",
    "CapacityError",
    "CgroupNotFound",
    "ConfigError",
    "Level",
    "Limiter",
    "LoadError",
    "MemoryLimitReached",
    "NotSupported",
    "PermissionDenied",
    "RequestMemoryExceeded",
    "RtmlError",
    "Stats",
    "configure",
    "default_limiter",
    "guard",
    "is_mem_limit_reached",
    "parse_threshold",
    "charged_to_request",
    "parse_threshold_text",
    "wait_for_headroom",
]
__version__ = "0.2.0"

if TYPE_CHECKING:
    from .admission import Admission, charged_to_request


def __getattr__(name: str) -> Any:
    # Admission (ledger, estimator, meters, enforcer) is imported on first use: a process that
    # only checks never pays for it at import.
    if name == "Admission":
        from .admission import Admission

        return Admission
    if name == "charged_to_request":
        from .admission import charged_to_request

        return charged_to_request
    raise AttributeError(f"module 'rtml_ebpf' has no attribute {name!r}")
