"""The contract between a Limiter and its backend (poll, eBPF, the node agent): all of it."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

from .._rules import Rule
from ..snapshot import Snapshot

if TYPE_CHECKING:
    from .meter import Meter


class Flag(Protocol):
    """``flag[0]`` is the hot-path answer: True while the rule is tripped."""

    def __getitem__(self, index: int) -> bool: ...


class Backend(Protocol):
    """What a Limiter needs from a backend, all of it: a Limiter never reaches past this.

    Per rule, ``add_rule`` returns an opaque flag; ``hot(flag)[0]`` is the verdict the hot
    path reads. Where ``hot_never_raises`` the Limiter binds ``operator.getitem(hot, 0)``
    directly as its check (a C call, no Python frame); otherwise it wraps the read in a
    method that turns a failure into the fail answer.
    """

    name: str
    reason: str
    hooks: tuple[str, ...]  # BPF hooks live (eBPF), () otherwise
    hot_never_raises: bool
    needs_upkeep: bool  # call maintain() every MAINTAIN_INTERVAL from the monitor

    def add_rule(self, rule: Rule) -> object: ...

    def remove_rule(self, flag: object, fail_answer: bool = False) -> None: ...

    def hot(self, flag: object) -> Flag: ...

    def snapshot(self, flag: object, full: bool = True) -> Snapshot:
        """``full=False``: a cheap reading for pressure estimates (no extra file reads / syscalls)."""
        ...

    def room(self, flag: object) -> tuple[int | None, int | None]:
        """(bytes before the rule trips, bytes before the OOM killer acts); None = unlimited.
        Cheap: admission calls it on every request."""
        ...

    def maintain(self, flag: object) -> None: ...

    def trips(self, flag: object) -> int:
        """How many times the rule behind ``flag`` went from clear to tripped."""
        ...

    def thread_meter(self) -> Meter | None:
        """The kernel-fed per-thread meter, where this backend has one."""
        ...

    def waker(self, flag: Any, poll: float) -> Any:
        """The enforcer's wake from the kernel for ``flag``'s cgroup (a ``Waker`` of
        rtml_ebpf/admission/enforce.py), where this backend has one; else None (it polls)."""
        ...

    def close(self) -> None: ...
