"""Named, cached probes of what this kernel and process can do for the eBPF backend.

Everything is settled before load, as libbpf-tools does: a hook whose
tracepoint is missing from the kernel's BTF (or has another prototype) is
turned off, never left to fail at attach.
"""

from __future__ import annotations

import ctypes
import functools
import os
import platform
from dataclasses import dataclass

from ..errors import NotSupported, PermissionDenied
from . import hooks
from . import libbpf as _libbpf

CAP_SYS_ADMIN = 21
CAP_PERFMON = 38
CAP_BPF = 39


@dataclass(frozen=True)
class Hook:
    name: str  # what we report
    program: str  # function name in rtml.bpf.c
    tracepoint: str  # btf_trace_<tracepoint> in the kernel's BTF
    nargs: int  # arguments after the leading void *
    since: str  # the first kernel that has it in this shape
    what: str


HOOKS: tuple[Hook, ...] = (
    Hook(hooks.MEMCG_LRUVEC, "handle_memcg_lruvec", "mod_memcg_lruvec_state", 3, "6.13",
         "per-memcg LRU/anon/file stat deltas (charges, frees, inactive_file)"),
    Hook(hooks.MEMCG_STATE, "handle_memcg_state", "mod_memcg_state", 3, "6.13",
         "per-memcg kernel-memory and socket stat deltas"),
    Hook(hooks.PAGE_FAULT_USER, "handle_page_fault", "page_fault_user", 3, "x86 (any kernel with BTF)",
         "every user page fault, before it is charged (BTF raw tracepoint)"),
    Hook(hooks.PAGE_ALLOC, "handle_page_alloc", "mm_page_alloc", 4, "2.6.32 (any kernel with BTF)",
         "page allocations: a metered thread's huge page counted at its size (beside page_fault_user)"),
    Hook(hooks.OOM_VICTIM, "handle_oom_victim", "mark_victim", 2, "6.8",
         "OOM victims, with the task they kill"),
)
HOOK_NAMES = tuple(h.name for h in HOOKS)
assert HOOK_NAMES == hooks.NAMES, "a hook without its probe (or the other way)"
MEMCG_HOOKS = hooks.MEMCG
FAULT_HOOKS = hooks.LEAN
BY_NAME = {h.name: h for h in HOOKS}


def cap_effective() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return int(line.split()[1], 16)
    except OSError:
        pass
    return 0


def check_privileges() -> None:
    """Raise PermissionDenied unless we may load tracing programs."""
    caps = cap_effective()
    if caps & (1 << CAP_SYS_ADMIN):
        return
    if caps & (1 << CAP_BPF) and caps & (1 << CAP_PERFMON):
        return
    raise PermissionDenied(f"euid {os.geteuid()} has neither CAP_SYS_ADMIN nor CAP_BPF+CAP_PERFMON")


VMLINUX_BTF = "/sys/kernel/btf/vmlinux"


def check_btf() -> None:
    if not _libbpf.vmlinux_btf_exists():
        raise NotSupported(
            "kernel BTF", f"{VMLINUX_BTF} is missing (kernel built without "
            "CONFIG_DEBUG_INFO_BTF)", min_kernel="5.4 with CONFIG_DEBUG_INFO_BTF=y"
        )
    try:
        size = os.stat(VMLINUX_BTF).st_size
    except OSError as exc:
        raise NotSupported("kernel BTF", f"{VMLINUX_BTF} cannot be read: {exc.strerror}") from None
    if size == 0:
        raise NotSupported("kernel BTF", f"{VMLINUX_BTF} is empty (something is mounted over it?)")
    _tracepoint_arity()  # parses it once (cached): a corrupt file is named here, not as missing hooks


@functools.cache
def _tracepoint_arity() -> dict[str, int | None]:
    """Arguments (after ``void *``) of each hook's ``btf_trace_<tracepoint>``; None when absent.

    One parse of the kernel's BTF for all hooks: it is several MiB and takes milliseconds.
    """
    lib = _libbpf.lib()
    out: dict[str, int | None] = {h.tracepoint: None for h in HOOKS}
    _libbpf.take_log()
    btf = lib.btf__load_vmlinux_btf()
    if not btf:
        err = ctypes.get_errno()
        said = _libbpf.take_log().strip().splitlines()
        raise NotSupported(
            "kernel BTF", f"libbpf could not load {VMLINUX_BTF} ({os.strerror(err) if err else 'failed'}"
            + (f"; libbpf: {said[-1]}" if said else "") + "); the kernel's BTF is unusable"
        )
    try:
        for tracepoint in out:
            type_id = lib.btf__find_by_name_kind(btf, f"btf_trace_{tracepoint}".encode(), _libbpf.BTF_KIND_TYPEDEF)
            if type_id < 0:
                continue
            t = lib.btf__type_by_id(btf, type_id).contents  # typedef -> ptr -> func_proto
            for _ in range(3):
                if t.kind == _libbpf.BTF_KIND_FUNC_PROTO:
                    out[tracepoint] = max(0, int(t.vlen) - 1)
                    break
                t = lib.btf__type_by_id(btf, t.size_type).contents
        return out
    finally:
        lib.btf__free(btf)


def tracepoint_nargs(tracepoint: str) -> int | None:
    return _tracepoint_arity().get(tracepoint)


def hook_unavailable(hook: Hook) -> str | None:
    """Why this kernel cannot take ``hook``, or None when it can."""
    if hook.name == hooks.PAGE_FAULT_USER and platform.machine() not in ("x86_64", "i686", "i386"):
        return "exceptions:page_fault_user exists on x86 only"
    nargs = tracepoint_nargs(hook.tracepoint)
    if nargs is None:
        return f"tracepoint {hook.tracepoint} not in this kernel (added in {hook.since})"
    if nargs != hook.nargs:
        return f"tracepoint {hook.tracepoint} has {nargs} arguments here, we need {hook.nargs} ({hook.since}+)"
    return None
