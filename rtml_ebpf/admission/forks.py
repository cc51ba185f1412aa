"""This process's pid and the calling thread's native id, kept without a system call on the
request path.

``os.getpid()`` is a system call (glibc stopped caching it in 2.25); admission asked it several
times per request to notice a fork (gunicorn, uWSGI and multiprocessing fork workers after the
service was set up). The fork hook below keeps :data:`pid` current instead: it runs in every child
made by ``os.fork`` (multiprocessing's fork start method too) and by servers that fork in C and
call ``PyOS_AfterFork_Child`` (uWSGI).
"""

from __future__ import annotations

import os
import threading

pid = os.getpid()


def _after_fork_in_child() -> None:
    global pid, _tls
    pid = os.getpid()
    _tls = threading.local()  # the thread that forked has a new native id in the child


os.register_at_fork(after_in_child=_after_fork_in_child)


_tls = threading.local()


def native_id() -> int:
    """``threading.get_native_id()`` (a ``gettid`` system call each time), cached per thread."""
    try:
        return _tls.tid  # type: ignore[no-any-return]
    except AttributeError:
        tid = _tls.tid = threading.get_native_id()
        return tid
