"""Which backend a Limiter gets, the fallbacks, and following the node agent (issue 20).

``auto`` is, in order: the node agent when one answers on its socket (root or not: the node
then pays for one set of programs, whatever the number of processes); else the node's shared
load (``backends/shared.py``: an agent this library starts on demand for root processes, on a
private socket and pin directory); else this process's own programs; else polling the cgroup
files. ``backend="ebpf"`` always loads this process's own programs. Each step that was passed
over says why in ``stats().backend_reason``.

Imports are at module level on purpose: the default limiter builds in a background thread,
and a fork while that thread holds a module's import lock would leave the child blocked on it.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable

from .. import _cgroup
from .._rules import Rule
from ..config import env_hooks
from ..ebpf import probes
from ..errors import AgentUnavailable, CapacityError, CgroupNotFound, ConfigError, PermissionDenied, RtmlError
from . import shared
from .agent import AgentBackend, socket_path
from .base import Backend
from .poll import PollBackend

log = logging.getLogger("rtml_ebpf")

AGENT_RETRY_INTERVAL = 5.0  # a Limiter that lost the node agent looks for it again this often
Registered = tuple[Backend, object, object | None]
Register = Callable[[Backend], Registered]


def resolve_cgroup(cgroup: object, pid: object) -> _cgroup.MemoryCgroup:
    if cgroup is not None and pid is not None:
        raise ConfigError(f"cgroup={cgroup!r} and pid={pid!r}: pass one of them, not both")
    if pid is not None:
        if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0:
            raise ConfigError(f"pid={pid!r}: pass a positive process id")
        return _cgroup.find_process_cgroup(pid)
    if cgroup is None:
        return _cgroup.find_process_cgroup()
    if not isinstance(cgroup, (str, os.PathLike)):
        raise CgroupNotFound(f"cgroup={cgroup!r}: pass a cgroup directory path (str), or None for this process")
    return _cgroup.cgroup_from_directory(os.fspath(cgroup))


def register_rules(backend: Backend, hard: Rule, soft: Rule | None) -> Registered:
    """The hard rule (and the soft one) on ``backend``: (backend, hard handle, soft handle)."""
    handle = backend.add_rule(hard)
    soft_handle = None
    if soft is not None:
        try:
            soft_handle = backend.add_rule(soft)
        except BaseException:
            backend.remove_rule(handle)
            raise
    return backend, handle, soft_handle


def _registered(register: Register, backend: Backend) -> Registered:
    """``register(backend)``, closing the backend when that fails."""
    try:
        return register(backend)
    except BaseException:
        backend.close()
        raise


def no_room(exc: BaseException) -> bool:
    """The agent refused a threshold because the cgroup's page has no rule byte left."""
    return isinstance(exc, CapacityError) or "distinct thresholds" in str(exc)


def build(cg: _cgroup.MemoryCgroup, backend: str, interval: float, register: Register) -> Registered:
    """The backend asked for, with the Limiter's rules registered (``register``)."""
    if backend == "poll":
        return register(PollBackend(cg, "poll requested", min_interval=interval))
    if backend == "agent":
        return _registered(register, AgentBackend(cg, "agent requested"))
    env_hooks()  # a bad RTML_HOOKS is a ConfigError naming it, never eBPF quietly skipped
    if backend == "ebpf":
        from .ebpf import EbpfBackend

        return _registered(register, EbpfBackend(cg, "ebpf requested"))
    return _auto(cg, interval, register)


def _auto(cg: _cgroup.MemoryCgroup, interval: float, register: Register) -> Registered:
    passed: list[str] = []

    def poll(why: str) -> Registered:
        return register(PollBackend(cg, "auto: " + "; ".join([*passed, why]), min_interval=interval))

    path = socket_path()
    if os.path.exists(path):
        try:
            return _registered(register, AgentBackend(cg, f"auto: the node agent at {path} answered"))
        except AgentUnavailable as exc:
            if no_room(exc):  # another load would cost the node as much again: poll this one
                return poll(f"the node agent at {path} has no room for this threshold ({exc}); polling the "
                            "cgroup files")
            passed.append(f"node agent at {path} unavailable ({exc})")
    else:
        passed.append(f"no node agent at {path}")
    try:
        probes.check_privileges()
    except PermissionDenied as exc:  # neither the shared load nor own programs: say it once
        return poll(f"no eBPF for this process ({exc}); polling the cgroup files")
    why_not = shared.unusable(cg)
    if why_not is None:
        try:
            return shared.join(cg, "auto: " + "; ".join(passed), register)
        except (AgentUnavailable, CapacityError) as exc:
            if no_room(exc):
                return poll(f"the node's shared load has no room for this threshold ({exc}); polling the "
                            "cgroup files")
            passed.append(f"the node's shared load unavailable ({exc})")
        except (RtmlError, OSError) as exc:
            passed.append(f"the node's shared load unavailable ({exc})")
    else:
        passed.append(why_not)
    try:
        from .ebpf import EbpfBackend

        return _registered(register, EbpfBackend(cg, "auto: " + "; ".join(passed) + "; own eBPF programs"))
    except ConfigError:
        raise
    except CapacityError as exc:
        return poll(f"eBPF at capacity ({exc}); polling the cgroup files")
    except (RtmlError, OSError) as exc:  # (the agent was passed over above, saying why)
        return poll(f"own eBPF programs unavailable ({exc}); polling the cgroup files")


class AgentFollow:
    """A Limiter that wanted the agent (``agent`` or ``auto``): poll when its agent is lost,
    and look for an agent again every AGENT_RETRY_INTERVAL while polling."""

    __slots__ = ("requested", "retry_at")

    def __init__(self, requested: str) -> None:
        self.requested = requested
        self.retry_at = 0.0

    def arm(self) -> None:
        self.retry_at = time.monotonic() + AGENT_RETRY_INTERVAL

    def wanted(self, current: Backend) -> bool:
        """Whether the monitor should call :meth:`next` for this backend."""
        return bool(self.retry_at) or current.name == "agent"

    def next(self, cg: _cgroup.MemoryCgroup, cgroup_id: int, current: Backend,
             interval: float) -> tuple[Backend, str] | None:
        """The backend to switch to now (and why), or None. ``cgroup_id``: the Limiter's, so a
        poll backend never reads another cgroup made at the same path since."""
        lost = getattr(current, "lost", None)
        if lost:
            self.arm()
            return (PollBackend(cg, f"node agent lost ({lost}); polling the cgroup files", min_interval=interval,
                                cgroup_id=cgroup_id), f"node agent lost ({lost})")
        if current.name != "poll" or self.requested not in ("agent", "auto") or not self.retry_at:
            return None
        now = time.monotonic()
        if now < self.retry_at:
            return None
        self.retry_at = now + AGENT_RETRY_INTERVAL
        if os.path.exists(socket_path()):
            return AgentBackend(cg, "node agent back"), "node agent back"
        if self.requested == "auto":
            if shared.unusable(cg) is None and shared.answers():
                return shared.backend(cg, "the node's shared load back"), "the node's shared load back"
        return None
