"""ctypes declarations for the parts of libbpf (>= 1.0) we use. No logic beyond
turning a libbpf failure into an exception, and capturing libbpf's log so a
failed load can show the verifier's reason.
"""

from __future__ import annotations

import collections
import ctypes
import ctypes.util
import logging
import os
import threading
from typing import Any

from ..errors import LoadError, NotSupported

log = logging.getLogger("rtml_ebpf.libbpf")

# enum libbpf_print_level
LIBBPF_WARN, LIBBPF_INFO, LIBBPF_DEBUG = 0, 1, 2
# BTF kinds (include/uapi/linux/btf.h)
BTF_KIND_PTR = 2
BTF_KIND_TYPEDEF = 8
BTF_KIND_FUNC_PROTO = 13


class BtfType(ctypes.Structure):
    _fields_ = [("name_off", ctypes.c_uint32), ("info", ctypes.c_uint32), ("size_type", ctypes.c_uint32)]

    @property
    def kind(self) -> int:
        return int(self.info >> 24) & 0x1F

    @property
    def vlen(self) -> int:
        return int(self.info) & 0xFFFF


_PRINT_FN = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)
# ring_buffer_sample_fn: int (*)(void *ctx, void *data, size_t size)
RING_SAMPLE_FN = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)

_lib: Any = None
_libc: Any = None
_lib_lock = threading.Lock()


def _after_fork_in_child() -> None:
    # A thread loading libbpf at the fork (the default limiter's background load) holds this.
    global _lib_lock
    _lib_lock = threading.Lock()


os.register_at_fork(after_in_child=_after_fork_in_child)
_log_lines: collections.deque[str] = collections.deque(maxlen=400)
_verbose = False


def set_verbose(on: bool) -> None:
    """Pass libbpf's debug output (verifier logs included) to logging at DEBUG."""
    global _verbose
    _verbose = on


def take_log() -> str:
    text = "".join(_log_lines)
    _log_lines.clear()
    return text


def _on_print(level: int, fmt: bytes, args: int) -> int:
    # One call carries a whole verifier log, whose reason is at its end: room for all of it.
    buf = ctypes.create_string_buffer(1 << 20)
    _libc.vsnprintf(buf, len(buf), fmt, ctypes.c_void_p(args))
    line = buf.value.decode(errors="replace")
    if level <= LIBBPF_INFO or _verbose:
        _log_lines.append(line)
    if _verbose:
        log.debug("%s", line.rstrip())
    elif level == LIBBPF_WARN:
        log.info("%s", line.rstrip())
    return 0


_print_cb = _PRINT_FN(_on_print)  # kept alive for the life of the process


def _declare(lib: Any) -> None:
    P, INT, U32, S32 = ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32, ctypes.c_int32
    sigs: dict[str, tuple[Any, list[Any]]] = {
        "libbpf_set_print": (P, [_PRINT_FN]),
        "bpf_object__open_file": (P, [ctypes.c_char_p, P]),
        "bpf_object__load": (INT, [P]),
        "bpf_object__close": (None, [P]),
        "bpf_object__find_program_by_name": (P, [P, ctypes.c_char_p]),
        "bpf_object__find_map_by_name": (P, [P, ctypes.c_char_p]),
        "bpf_program__set_autoload": (INT, [P, ctypes.c_bool]),
        "bpf_program__attach": (P, [P]),
        "bpf_program__fd": (INT, [P]),
        "bpf_link__destroy": (INT, [P]),
        "bpf_map__fd": (INT, [P]),
        "bpf_map_update_elem": (INT, [INT, P, P, ctypes.c_uint64]),
        "bpf_map_delete_elem": (INT, [INT, P]),
        "bpf_map_lookup_elem": (INT, [INT, P, P]),
        "bpf_obj_get_info_by_fd": (INT, [INT, P, ctypes.POINTER(U32)]),
        "bpf_map__set_max_entries": (INT, [P, U32]),
        "bpf_map__reuse_fd": (INT, [P, INT]),
        "bpf_map_create": (INT, [INT, ctypes.c_char_p, U32, U32, U32, P]),
        "bpf_map_freeze": (INT, [INT]),
        "bpf_map_get_next_key": (INT, [INT, P, P]),
        "bpf_map_get_fd_by_id": (INT, [U32]),
        "bpf_obj_pin": (INT, [INT, ctypes.c_char_p]),
        "bpf_obj_get": (INT, [ctypes.c_char_p]),
        "bpf_link__pin": (INT, [P, ctypes.c_char_p]),
        "bpf_link__fd": (INT, [P]),
        "bpf_prog_test_run_opts": (INT, [INT, P]),
        "ring_buffer__new": (P, [INT, RING_SAMPLE_FN, P, P]),
        "ring_buffer__consume": (INT, [P]),
        "ring_buffer__epoll_fd": (INT, [P]),
        "ring_buffer__free": (None, [P]),
        "bpf_prog_get_next_id": (INT, [U32, ctypes.POINTER(U32)]),
        "bpf_prog_get_fd_by_id": (INT, [U32]),
        "btf__load_vmlinux_btf": (P, []),
        "btf__find_by_name_kind": (S32, [P, ctypes.c_char_p, U32]),
        "btf__type_by_id": (ctypes.POINTER(BtfType), [P, U32]),
        "btf__free": (None, [P]),
    }
    for name, (restype, argtypes) in sigs.items():
        fn = getattr(lib, name)
        fn.restype = restype
        fn.argtypes = argtypes


def lib() -> Any:
    """The loaded libbpf, or NotSupported naming the package to install."""
    global _lib, _libc
    with _lib_lock:
        if _lib is not None:
            return _lib
        # The soname first: find_library spawns ldconfig, which costs tens of milliseconds.
        name = "libbpf.so.1"
        try:
            try:
                handle = ctypes.CDLL(name, use_errno=True)
            except OSError:
                name = ctypes.util.find_library("bpf") or name
                handle = ctypes.CDLL(name, use_errno=True)
            _declare(handle)
        except (OSError, AttributeError) as exc:
            raise NotSupported(
                "libbpf", f"cannot load {name} ({exc}); apt-get install libbpf1 (1.0 or newer)"
            ) from exc
        _libc = ctypes.CDLL("libc.so.6")
        _libc.vsnprintf.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_char_p, ctypes.c_void_p]
        _libc.vsnprintf.restype = ctypes.c_int
        handle.libbpf_set_print(_print_cb)
        _lib = handle
        return _lib


def check(ret: int, step: str, name: str) -> int:
    """libbpf 1.x returns -errno from int APIs."""
    if ret < 0:
        raise LoadError(step, name, -ret, take_log())
    return ret


def check_ptr(ptr: int | None, step: str, name: str) -> int:
    """libbpf 1.x returns NULL and sets errno from pointer APIs."""
    if not ptr:
        raise LoadError(step, name, ctypes.get_errno() or 0, take_log())
    return ptr


class MapCreateOpts(ctypes.Structure):
    """struct bpf_map_create_opts (libbpf >= 0.7)."""

    _fields_ = [("sz", ctypes.c_size_t), ("btf_fd", ctypes.c_uint32), ("btf_key_type_id", ctypes.c_uint32),
                ("btf_value_type_id", ctypes.c_uint32), ("btf_vmlinux_value_type_id", ctypes.c_uint32),
                ("inner_map_fd", ctypes.c_uint32), ("map_flags", ctypes.c_uint32), ("map_extra", ctypes.c_uint64),
                ("numa_node", ctypes.c_uint32), ("map_ifindex", ctypes.c_uint32)]


class TestRunOpts(ctypes.Structure):
    """struct bpf_test_run_opts (libbpf >= 0.7)."""

    _fields_ = [("sz", ctypes.c_size_t), ("data_in", ctypes.c_void_p), ("data_out", ctypes.c_void_p),
                ("data_size_in", ctypes.c_uint32), ("data_size_out", ctypes.c_uint32),
                ("ctx_in", ctypes.c_void_p), ("ctx_out", ctypes.c_void_p), ("ctx_size_in", ctypes.c_uint32),
                ("ctx_size_out", ctypes.c_uint32), ("retval", ctypes.c_uint32), ("repeat", ctypes.c_int),
                ("duration", ctypes.c_uint32), ("flags", ctypes.c_uint32), ("cpu", ctypes.c_uint32),
                ("batch_size", ctypes.c_uint32)]


def map_info(fd: int) -> tuple[int, int, int, int, int, int]:
    """(type, id, key_size, value_size, max_entries, map_flags) of a map fd."""
    info = (ctypes.c_uint32 * 32)()
    size = ctypes.c_uint32(ctypes.sizeof(info))
    check(lib().bpf_obj_get_info_by_fd(fd, info, ctypes.byref(size)), "get info of", f"map fd {fd}")
    return info[0], info[1], info[2], info[3], info[4], info[5]


def prog_id(fd: int) -> int:
    """The kernel id of a loaded program (bpftool prog show id N)."""
    # struct bpf_prog_info starts with: __u32 type; __u32 id; ...
    info = (ctypes.c_uint8 * 256)()
    size = ctypes.c_uint32(256)
    check(lib().bpf_obj_get_info_by_fd(fd, info, ctypes.byref(size)), "get info of", f"prog fd {fd}")
    return int.from_bytes(bytes(info[4:8]), "little")


# struct bpf_prog_info offsets (uapi, stable): run_time_ns and run_cnt (5.1+)
PROG_INFO_SIZE = 232
PROG_RUN_TIME_NS, PROG_RUN_CNT = 192, 200


def prog_run_stats(fd: int) -> tuple[int, int]:
    """(nanoseconds run, runs) of a program, counted while kernel.bpf_stats_enabled is 1."""
    info = (ctypes.c_uint8 * PROG_INFO_SIZE)()
    size = ctypes.c_uint32(PROG_INFO_SIZE)
    check(lib().bpf_obj_get_info_by_fd(fd, info, ctypes.byref(size)), "get info of", f"prog fd {fd}")
    raw = bytes(info)
    return (int.from_bytes(raw[PROG_RUN_TIME_NS:PROG_RUN_TIME_NS + 8], "little"),
            int.from_bytes(raw[PROG_RUN_CNT:PROG_RUN_CNT + 8], "little"))


def link_prog_id(fd: int) -> int:
    """The program a link attaches (struct bpf_link_info: type, id, prog_id)."""
    info = (ctypes.c_uint32 * 32)()
    size = ctypes.c_uint32(ctypes.sizeof(info))
    check(lib().bpf_obj_get_info_by_fd(fd, info, ctypes.byref(size)), "get info of", f"link fd {fd}")
    return int(info[2])


def vmlinux_btf_exists() -> bool:
    return os.path.exists("/sys/kernel/btf/vmlinux")
