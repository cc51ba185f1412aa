"""The eBPF side: the packaged BPF object (bpf/rtml.bpf.c, ABI in bpf/rtml.h) loaded through
libbpf: the kernel side that the eBPF backend (rtml_ebpf.backends.ebpf) and the node agent
(rtml_ebpf.agent) share.

    libbpf.py   ctypes declarations of libbpf (errno becomes an exception there)
    abi.py      ctypes mirror of bpf/rtml.h (tests/test_abi.py checks every offset)
    probes.py   named, cached probes: privileges, kernel BTF, which hooks this kernel has
    loader.py   probe -> open -> choose hooks -> load -> attach -> map, one undo path
    slots.py    watched cgroups: slots, rules, the kernel's readings
    runtime.py  the per-process owner shared by every Limiter: references, locking, fork
"""
