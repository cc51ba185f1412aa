"""Exceptions raised by rtml-ebpf.

Every error derives from :class:`RtmlError`. Bad arguments raise the builtin
``ValueError`` / ``LookupError`` (subclassed here so callers may catch either
the builtin or ours), because that is what a caller checking input expects.
"""

from __future__ import annotations


class RtmlError(Exception):
    """Base class of every rtml-ebpf error."""


class ConfigError(RtmlError, ValueError):
    """A parameter or environment variable has a value we cannot use."""


class CgroupNotFound(RtmlError, LookupError):
    """The memory cgroup asked for does not exist or cannot be used."""


class CapacityError(RtmlError):
    """A fixed capacity of the loaded programs is used up (slots, rules per cgroup, nesting).
    ``backend="auto"`` falls back to polling on it."""


class NotSupported(RtmlError):
    """The kernel or the process lacks a feature the eBPF backend needs."""

    def __init__(self, feature: str, reason: str, min_kernel: str | None = None) -> None:
        self.feature = feature
        self.reason = reason
        self.min_kernel = min_kernel
        hint = f" (needs Linux {min_kernel} or newer)" if min_kernel else ""
        super().__init__(f"{feature} is not available: {reason}{hint}")


class PermissionDenied(NotSupported):
    """Loading BPF programs needs root, or CAP_BPF with CAP_PERFMON."""

    def __init__(self, reason: str) -> None:
        super().__init__("eBPF", reason + "; run as root or grant CAP_BPF and CAP_PERFMON")


class LoadError(RtmlError):
    """A libbpf step failed. ``log`` holds what libbpf printed (the verifier log)."""

    def __init__(self, step: str, name: str, errno: int, log: str = "") -> None:
        import os

        self.step = step
        self.name = name
        self.errno = errno
        self.log = log
        message = f"{step} {name}: {os.strerror(errno) if errno else 'failed'}"
        if log:
            tail = "\n".join(log.strip().splitlines()[-25:])
            message += f"\n--- libbpf log (last lines) ---\n{tail}"
        super().__init__(message)


class MemoryLimitReached(RtmlError):
    """Raised by :func:`rtml_ebpf.guard` when the memory limit is reached."""


class AgentUnavailable(NotSupported):
    """The node agent cannot serve this process: no socket, it refused, or its programs are gone."""

    def __init__(self, reason: str) -> None:
        super().__init__("the rtml-ebpf node agent", reason)


class RequestMemoryExceeded(MemoryLimitReached):
    """Raised inside a request (in its thread, its threadpool work, or its coroutine) that the
    admission's enforcer ended: the cgroup was about to be OOM-killed and this request had
    overrun its reservation the most. The integrations answer 503 when no response has started.
    Raised as a class (``PyThreadState_SetAsyncExc`` takes no instance): the details are logged
    and counted where it was decided."""
