"""Levels, transition callbacks and relief on the calling process's own cgroup.

Run: python examples/callbacks.py
"""

import rtml_ebpf


def tripped(stats: rtml_ebpf.Stats) -> None:
    print(f"level {stats.level}: {stats.working_set_bytes >> 20} MiB of {stats.limit_bytes}")  # page someone


with rtml_ebpf.Limiter(threshold=0.9, soft_threshold=0.75, hysteresis=0.05, on_trip=tripped) as lim:
    print("level:", lim.level().name, "| shed probability:", lim.pressure())
    s = lim.stats()
    print(f"backend {s.backend} ({s.backend_reason}); working set {s.working_set_bytes >> 20} MiB")
