"""Where a Limiter's readings come from: one contract, three members, one chooser.

    base.py        the contract every backend keeps (:class:`Backend`), the ``Snapshot`` a reading
                   is, and the room arithmetic they share
    poll.py        the cgroup files, cached for a minimum interval (any kernel, any user)
    ebpf.py        this process's view of BPF programs it loaded or adopted (rtml_ebpf.ebpf)
    agent.py       the node agent's verdicts: a read-only page of this process's cgroup
    agent_maps.py  the client's mappings of the agent's pages (frozen pages, the thread meter)
    meter.py       per-thread charge meters: the kernel's (eBPF, agent) or getrusage's
    choose.py      ``auto`` and the fallbacks: agent, the node's shared load, own eBPF, poll;
                   following the agent when it goes and comes back
    shared.py      the node's shared load: an agent started on demand for root processes
    kept.py        checks bound to an earlier backend follow the Limiter's current one

The BPF object, its loader and its ABI are not a backend: they live in :mod:`rtml_ebpf.ebpf`,
which the node agent uses as well. A reading of a cgroup is a :class:`rtml_ebpf.snapshot.Snapshot`;
the cgroup's files are read by :mod:`rtml_ebpf.cgroup_files`.
"""
