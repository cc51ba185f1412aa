"""The eBPF side: the packaged BPF object (bpf/rtml.bpf.c, ABI in bpf/rtml.h) loaded through
libbpf: the kernel side that the eBPF backend (rtml_ebpf.backends.ebpf) and the node agent
(rtml_ebpf.agent) share.

    libbpf.py   ctypes declarations of libbpf (errno becomes an exception there)
    abi.py      ctypes mirror of bpf/rtml.h (tests/test_abi.py checks every offset)
    hooks.py    the hooks' names and sets, spelled once
    probes.py   named, cached probes: privileges, kernel BTF, which hooks this kernel has
    loader.py   probe -> open -> choose hooks -> load -> attach -> map, one undo path
    slots.py    watched cgroups: slots, rules, the kernel's readings
    readings.py readings of watched slots (lock-free words, per-CPU counters, the upkeep)
    words.py    a slot's words as both sides read them (no state)
    runtime.py  the per-process owner shared by every Limiter: references, locking, fork
    ring.py     the OOM events ring's reader
    wake.py     the enforcer's wake ring (a watched cgroup's use reached a level)
"""
