"""The node agent: one privileged process loads the BPF programs once for the node and hands
each unprivileged client a read-only page with its own cgroup's verdicts (``rtml-ebpf agent``).

The agent process (root), by job:

- ``server.py``: :class:`Agent` and :class:`AgentConfig`: the selector loop, its timers, and the
  wiring of the parts below
- ``startup.py``: set-up before serving (fd limit, host cgroup namespace, the Unix socket and
  HTTP listeners)
- ``programs.py``: the BPF side (load or adopt pins, pages, the beat)
- ``pinsafe.py``: pin paths checked (no symlinks, root-owned, not writable by others)
- ``reattach.py``: programs detached under the agent attached again
- ``scan.py``: which memory cgroups of the node are watched
- ``leases.py``: the watched cgroups and the rules held on them (leases, linger, adoption of
  pinned rules, upkeep)
- ``conns.py``: client connections and the caps on them (accept, read, rate limit, reply, close)
- ``peer.py``: a client's identity and cgroup, from the kernel
- ``handlers.py``: the socket's ops (watch, events, stats): validation and replies
- ``protocol.py``: the socket's messages, shared with the client
- ``oomfeed.py``: OOM kills read (ring or memory.events) and fanned out to subscribers
- ``httpd.py``: the HTTP thread (/metrics, /healthz, /readyz)
- ``metrics.py``: the Prometheus exposition, rendered from an ``AgentView`` snapshot
- ``metrics_access.py``: who may read /metrics (bearer token, or root on loopback)
- ``health.py``: liveness and readiness, as the probes ask them
- ``notify.py``: systemd's notify protocol (READY, WATCHDOG, STOPPING)

The client's side, ``Limiter(backend="agent")``, is a backend: :mod:`rtml_ebpf.backends.agent`.
"""
