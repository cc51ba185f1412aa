"""The eBPF side: the packaged BPF object (bpf/rtml.bpf.c, ABI in bpf/rtml.h) loaded through
libbpf, and the backend a Limiter uses on it.

    libbpf.py   ctypes declarations of libbpf (errno becomes an exception there)
    abi.py      ctypes mirror of bpf/rtml.h (tests/test_abi.py checks every offset)
    probes.py   named, cached probes: privileges, kernel BTF, which hooks this kernel has
    loader.py   probe -> open -> choose hooks -> load -> attach -> map, one undo path
    slots.py    watched cgroups: slots, rules, the kernel's readings
    runtime.py  the per-process owner shared by every Limiter: references, locking, fork
    backend.py  the Limiter's backend (rtml_ebpf._backend.Backend) on the runtime
"""
