"""Admission by memory budget: let a request in only if what it will allocate fits, charge it for
every thread that works for it, and end it, not the process, when it overruns.

One module, one job:

- ``budget.py``: :class:`Admission`, the budget of one cgroup (try_admit, finish, bind, stats);
- ``rule.py``: :func:`decide`, the admission rule as pure arithmetic;
- ``ticket.py``: :class:`Ticket`, one admitted request and what it has charged;
- ``gate.py`` and ``body.py``: a request's body as it is read (a grown reservation re-checked, a
  pending request's slot taken once its body is in) and a learning slot freed as the response
  goes out; ``shapes.py``: requests bound to another thread, asyncio requests;
- ``sums.py``: this process's totals and the guess for a route not learned here;
- ``estimator.py``: per-route, per-size-class cost estimates learned from measured requests;
- ``ledger.py`` and ``ledger_join.py``: the reservations shared by every process of the cgroup
  (a file in a directory private to the uid);
- ``follow.py``: the request's account, carried in a context variable into threadpool work
  (anyio, asyncio.to_thread, asgiref) and :func:`charged_to_request` for other executors;
- ``stepped.py``: asyncio requests metered step by step on the event loop's thread;
- ``enforce.py``: the enforcer that ends the requests that overran their reservation most when
  the room before the OOM killer falls below a guard band;
- ``policy.py``: the shedding decision every integration (ASGI, WSGI, gRPC, guard) shares.

The per-thread meters themselves come from the backends (``rtml_ebpf.backends.meter``).
"""

from __future__ import annotations

from .budget import Admission, AdmissionStats
from .follow import charged_to_request
from .rule import decide
from .ticket import Ticket

__all__ = ["Admission", "AdmissionStats", "Ticket", "charged_to_request", "decide"]
