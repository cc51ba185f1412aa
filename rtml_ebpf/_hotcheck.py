"""The hot check as a C callable over a one-byte verdict view (rtml_ebpf/_hot.c), with the
pure-Python binding where the extension was not built."""

from __future__ import annotations

import functools
import operator
from typing import Any


class _EitherByte:
    """``view[0] or ahead[0]`` where the C Verdict was not built."""

    __slots__ = ("view", "ahead", "watch")

    def __init__(self, view: Any, ahead: bytearray) -> None:
        self.view, self.ahead, self.watch = view, ahead, None

    def __call__(self) -> bool:
        return bool(self.view[0] or self.ahead[0])

    def __getitem__(self, index: int) -> bool:
        return self()


def hot_check(view: Any, ahead: bytearray | None = None) -> Any:
    """A zero-argument C callable answering ``bool(view[0])`` for a one-byte verdict view (or
    ``ahead[0]``, the trip-ahead flag, where given)."""
    try:
        from ._hot import Verdict

        return Verdict(view) if ahead is None else Verdict(view, 0, ahead)
    except ImportError:  # built without a compiler: the pure-Python binding (about 2x slower)
        if ahead is not None:
            return _EitherByte(view, ahead)
        return functools.partial(operator.getitem, view, 0)
