"""The node agent: one privileged process loads the BPF programs once for the node and hands
each unprivileged client a read-only page with its own cgroup's verdicts (``rtml-ebpf agent``).

- ``programs.py``: the BPF side (load or adopt pins, pages, the beat)
- ``scan.py``: which memory cgroups of the node are watched
- ``peer.py``: a client's identity and cgroup, from the kernel
- ``protocol.py``: the socket's messages, shared with the client
- ``server.py``: the agent itself (socket, leases, upkeep)
- ``client.py``: ``Limiter(backend="agent")``
"""
