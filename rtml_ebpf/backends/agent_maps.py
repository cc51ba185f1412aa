"""The client's mappings of the agent's pages and what goes with them: read-only maps of a frozen
page, replacing one in place by a private page (a retired lease), the per-thread meter on the
agent's pinned ``threads`` array (root clients), and the counters round trip."""

from __future__ import annotations

import ctypes
import mmap
import os
import select
import socket
import threading
from collections.abc import Callable
from typing import Any

from ..agent import protocol
from ..config import PAGE_SIZE
from ..ebpf import abi
from ..ebpf import libbpf as _libbpf
from ..ebpf.loader import map_len, meter_on
from ..errors import AgentUnavailable, RtmlError

PROT_READ, PROT_WRITE = 1, 2
MAP_SHARED, MAP_PRIVATE, MAP_FIXED, MAP_ANONYMOUS = 0x01, 0x02, 0x10, 0x20

_libc: Any = None


def libc() -> Any:
    global _libc
    if _libc is None:
        lib = ctypes.CDLL(None, use_errno=True)
        lib.mmap.restype = ctypes.c_void_p
        lib.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                             ctypes.c_long]
        _libc = lib
    return _libc


class _PyBuffer(ctypes.Structure):
    _fields_ = [("buf", ctypes.c_void_p), ("obj", ctypes.py_object), ("len", ctypes.c_ssize_t),
                ("itemsize", ctypes.c_ssize_t), ("readonly", ctypes.c_int), ("ndim", ctypes.c_int),
                ("format", ctypes.c_char_p), ("shape", ctypes.c_void_p), ("strides", ctypes.c_void_p),
                ("suboffsets", ctypes.c_void_p), ("internal", ctypes.c_void_p)]


def _address(obj: object) -> int:
    """The address of a (read-only) buffer: ctypes.from_buffer refuses read-only memory."""
    get, release = ctypes.pythonapi.PyObject_GetBuffer, ctypes.pythonapi.PyBuffer_Release
    get.argtypes = [ctypes.py_object, ctypes.POINTER(_PyBuffer), ctypes.c_int]
    release.argtypes = [ctypes.POINTER(_PyBuffer)]
    pb = _PyBuffer()
    if get(obj, ctypes.byref(pb), 0) != 0:
        raise AgentUnavailable("cannot address the agent's page")
    try:
        return int(pb.buf)
    finally:
        release(ctypes.byref(pb))


def _map_readonly(fd: int) -> tuple[int, mmap.mmap]:
    """The page, mapped read-only by a Python mmap object: the views handed out (the hot path's,
    kept checks') keep it mapped, and the last one gone unmaps it."""
    try:
        mm = mmap.mmap(fd, PAGE_SIZE, mmap.MAP_SHARED, mmap.PROT_READ)
    except OSError as exc:
        raise AgentUnavailable(f"cannot map the agent's page: {exc.strerror or exc}") from None
    return _address(mm), mm


def _retire_mapping(addr: int, fail_answer: bool) -> bool:
    """Replace the page at ``addr``, in place, with a private one whose verdict bytes hold the
    fail answer: every view of it (kept checks) answers that until the Limiter writes its
    current answer there (see :meth:`AgentBackend.kept_writer`). The mmap object that owns
    the address unmaps it when its last view goes. False when the page could not be replaced."""
    new = libc().mmap(addr, PAGE_SIZE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_FIXED | MAP_ANONYMOUS, -1, 0)
    if new != addr:
        return False
    ctypes.memmove(addr + abi.TRIPPED_OFFSET, bytes([int(fail_answer)] * abi.MAX_RULES), abi.MAX_RULES)
    return True


def ask_stats(sock: socket.socket, lock: threading.Lock, timeout: float) -> dict[str, Any] | None:
    """The counters, by a round trip on a lease's connection. Under the socket lock and
    without ever putting the socket in timeout mode: the monitor thread peeks at the same
    socket (client._closed), and a peek on a socket in timeout mode waits, times out, and reads
    as a closed connection (the lease was then dropped under this very request)."""
    # A timed acquire: a child forked while another thread held the lock skips, never hangs.
    if not lock.acquire(timeout=2 * timeout):
        return None
    try:
        try:
            while True:  # drop anything unread (nothing is expected); b"": the agent closed it
                try:
                    if not sock.recv(protocol.MAX_MESSAGE, socket.MSG_DONTWAIT):
                        return None
                except BlockingIOError:
                    break
            sock.send(protocol.encode({"v": protocol.VERSION, "op": "stats"}))
            if not select.select([sock], [], [], timeout)[0]:
                return None
            reply = protocol.decode(sock.recv(protocol.MAX_MESSAGE, socket.MSG_DONTWAIT))
            return reply if reply.get("ok") else None
        except Exception:  # noqa: BLE001 - counters are optional in a reading
            return None
    finally:
        lock.release()


def byte_writer(owner: object, at: int) -> Callable[[bool], None]:
    """A function writing an answer into the byte at ``at`` while ``owner.writable`` (it holds
    ``owner``, a retired lease, so its private page stays mapped)."""

    def write(answer: bool) -> None:
        if getattr(owner, "writable", False):
            ctypes.c_ubyte.from_address(at).value = int(answer)

    return write


def thread_meter_from_pins(pin_dir: str, beat_id: int) -> Any:
    """An EbpfThreadMeter over ``<pin_dir>/maps/threads`` when this process may open pins (root)
    and they belong to the agent whose beat map has id ``beat_id``; else None."""
    if beat_id <= 0 or os.geteuid() != 0:
        return None
    from .meter import EbpfThreadMeter

    try:
        lib = _libbpf.lib()
        fds = [lib.bpf_obj_get(os.path.join(pin_dir, "maps", name).encode()) for name in ("beat", "threads", "ctl")]
    except (OSError, RtmlError):
        return None
    try:
        if min(fds) < 0 or _libbpf.map_info(fds[0])[1] != beat_id:
            return None  # no pins, or another agent's: its threads array is not the one our programs write
        mm = mmap.mmap(fds[1], map_len(ctypes.sizeof(abi.Thread), abi.MAX_THREADS), mmap.MAP_SHARED,
                       mmap.PROT_READ | mmap.PROT_WRITE)
        with mmap.mmap(fds[2], map_len(ctypes.sizeof(abi.Ctl), 1), mmap.MAP_SHARED,
                       mmap.PROT_READ | mmap.PROT_WRITE) as ctl:
            meter_on(ctl)  # the programs charge registered threads from now on
    except (OSError, RtmlError):
        return None
    finally:
        for fd in fds:
            if fd >= 0:
                os.close(fd)
    return EbpfThreadMeter(memoryview(mm).cast("q"), abi.MAX_THREADS, mm)


def _map_id(fd: int) -> int:
    """The id of a map fd, for root (bpf() may be refused to others, who do not need it); else 0."""
    if os.geteuid() != 0 or fd < 0:
        return 0
    try:
        return _libbpf.map_info(fd)[1]
    except (OSError, RtmlError):
        return 0
