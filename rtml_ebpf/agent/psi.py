"""The agent's PSI triggers: one per watched cgroup on cgroup v2, ``some 150000 1000000``
written to its memory.pressure (wake when tasks of the cgroup stalled on memory for 150 ms
within any 1 s window). Only a process with CAP_SYS_RESOURCE may arm a window that is not a
multiple of 2 s, which is why the agent does it for its clients (without it: 300 ms in 2 s).

A trigger's fd reports POLLPRI, which a selector's EVENT_READ never asks for; so the triggers
sit in an epoll of their own, which the loop reads without waiting at every step (at least ten
times a second, against windows of a second or two). That epoll is not nested in the loop's
selector: the kernel's poll of a trigger clears the event it reports (psi_trigger_poll), so an
outer epoll checking the inner one for readiness would consume the event and the inner read
would find nothing. A fired trigger sets RTML_SLOT_STALLING in the cgroup's slot (the agent's
word: the programs never write it) and copies the slot into the clients' page (rtml_publish);
the bit clears once no trigger fired for two windows.
"""

from __future__ import annotations

import logging
import os
import select
from typing import TYPE_CHECKING

from .._psi import pressure_file
from ..ebpf import abi
from ..errors import RtmlError

if TYPE_CHECKING:
    from ..ebpf.slots import Slots, SlotState
    from .programs import NodePrograms

log = logging.getLogger("rtml_ebpf.agent")

STALL_SHARE = 0.15
# 1 s windows need CAP_SYS_RESOURCE; without it (a container's root) the kernel takes multiples
# of 2 s only: the same share over 2 s then
WINDOWS_US = (1_000_000, 2_000_000)
HOLD_WINDOWS = 2  # stalling stays set this many windows after the last firing


def trigger(window_us: int) -> bytes:
    """A memory.pressure trigger: some stall over STALL_SHARE of ``window_us`` (NUL-ended: the
    kernel overwrites the last byte written with one)."""
    return f"some {int(window_us * STALL_SHARE)} {window_us}".encode() + b"\0"


class PsiTriggers:
    def __init__(self, slots: Slots, node: NodePrograms) -> None:
        self.slots = slots
        self.node = node
        self.epoll = select.epoll()
        self.fds: dict[int, int] = {}  # cgroup id -> its trigger's fd
        self.hold: dict[int, float] = {}  # cgroup id -> seconds its bit stays set after a firing
        self.by_fd: dict[int, int] = {}
        self.until: dict[int, float] = {}  # cgroup id -> when its stalling bit clears
        self.fired = 0
        self.failed: set[int] = set()  # cgroups whose trigger could not be armed (logged once)

    def sync(self, watched: dict[int, SlotState]) -> None:
        """Arm a trigger for every watched v2 cgroup without one; close those of unwatched ones."""
        for cgid in [c for c in self.fds if c not in watched]:
            self._disarm(cgid)
        for cgid, state in watched.items():
            if cgid in self.fds or cgid in self.failed or state.cgroup.version != 2:
                continue
            path = pressure_file(state.cgroup)
            try:
                fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
            except OSError as exc:
                self._refuse(cgid, path, exc)
                continue
            window = self._arm(fd)
            if isinstance(window, OSError):
                os.close(fd)
                self._refuse(cgid, path, window)
                continue
            self.fds[cgid] = fd
            self.by_fd[fd] = cgid
            self.hold[cgid] = HOLD_WINDOWS * window / 1e6

    def _arm(self, fd: int) -> int | OSError:
        """The trigger written and the fd in the epoll: its window, or why not."""
        error = OSError("no window accepted")
        for window in WINDOWS_US:
            try:
                os.write(fd, trigger(window))
            except OSError as exc:
                error = exc  # EINVAL: a window this process may not arm; try the next
                continue
            try:
                self.epoll.register(fd, select.EPOLLPRI)
            except OSError as exc:
                return exc
            return window
        return error

    def _refuse(self, cgid: int, path: str, exc: OSError) -> None:
        self.failed.add(cgid)
        log.info("rtml-ebpf agent: no PSI trigger on %s: %s", path, exc.strerror or exc)

    def _disarm(self, cgid: int) -> None:
        fd = self.fds.pop(cgid)
        self.by_fd.pop(fd, None)
        self.hold.pop(cgid, None)
        self.until.pop(cgid, None)
        self.failed.discard(cgid)
        try:
            self.epoll.unregister(fd)
        except OSError:
            pass
        os.close(fd)

    def read(self, now: float) -> None:
        """From the loop, every step: mark the cgroups whose trigger fired (no wait)."""
        for fd, events in self.epoll.poll(0):
            cgid = self.by_fd.get(fd)
            if cgid is None:
                continue
            if events & (select.EPOLLERR | select.EPOLLHUP):
                self._disarm(cgid)  # the cgroup went away: the scan unwatches it
                continue
            self.fired += 1
            first = cgid not in self.until
            self.until[cgid] = now + self.hold.get(cgid, 2.0)
            if first:
                self._set(cgid, True)

    def expire(self, now: float) -> None:
        for cgid in [c for c, t in self.until.items() if t <= now]:
            del self.until[cgid]
            self._set(cgid, False)

    def stalling(self, cgid: int) -> bool:
        return cgid in self.until

    def _set(self, cgid: int, on: bool) -> None:
        state = self.slots.by_cgid.get(cgid)
        w = self.slots.words
        if state is None or w is None:
            return
        at = state.index * abi.SLOT_WORDS + abi.W_FLAGS
        w[at] = (w[at] | abi.SLOT_STALLING) if on else (w[at] & ~abi.SLOT_STALLING)
        try:
            self.node.publish(state.index)  # copy into the clients' page
        except (OSError, RtmlError):
            pass  # the bit stays in the slot (metrics read it there); the next rewrite copies it

    def close(self) -> None:
        for cgid in list(self.fds):
            self._disarm(cgid)
        self.epoll.close()
