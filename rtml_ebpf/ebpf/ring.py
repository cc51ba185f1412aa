"""Reads the programs' OOM events out of the `oom_events` ring buffer (libbpf's reader).

The reader is one consumer: two readers of one ring steal each other's events, which is why
only the agent (or a standalone ``rtml-ebpf events`` with programs of its own) opens it.
"""

from __future__ import annotations

import ctypes
import os

from ..errors import LoadError
from . import abi
from . import libbpf as _libbpf


class OomRing:
    """The ring of one loaded (or adopted) object: ``fileno()`` for a selector, ``drain()``."""

    def __init__(self, map_fd: int) -> None:
        self._got: list[abi.OomEvent] = []
        self._cb = _libbpf.RING_SAMPLE_FN(self._on_sample)  # kept alive while the ring is
        lib = _libbpf.lib()
        self._rb = lib.ring_buffer__new(map_fd, self._cb, None, None)
        if not self._rb:
            raise LoadError("open ring buffer", "map oom_events", ctypes.get_errno() or 0, _libbpf.take_log())
        self._fd = int(lib.ring_buffer__epoll_fd(self._rb))

    def _on_sample(self, ctx: int | None, data: int, size: int) -> int:
        raw = ctypes.string_at(data, min(size, ctypes.sizeof(abi.OomEvent)))
        if len(raw) == ctypes.sizeof(abi.OomEvent):
            self._got.append(abi.OomEvent.from_buffer_copy(raw))
        return 0

    def fileno(self) -> int:
        """An epoll fd that turns readable when events are waiting."""
        return self._fd

    def drain(self) -> list[abi.OomEvent]:
        """Every event waiting now (never blocks)."""
        if not self._rb:
            return []
        ret = _libbpf.lib().ring_buffer__consume(self._rb)
        if ret < 0:
            raise LoadError("read ring buffer", "map oom_events", -ret, os.strerror(-ret))
        got, self._got = self._got, []
        return got

    def close(self) -> None:
        if self._rb:
            _libbpf.lib().ring_buffer__free(self._rb)
            self._rb = None
