"""The programs' hooks by name: the one place each name is spelled.

A name is what we report and what ``RTML_HOOKS`` takes; :mod:`.probes` pairs each with its program
and tracepoint. This module imports nothing, so settings (``rtml_ebpf.config``) and the agent's
protocol can name hooks on machines where libbpf is absent.
"""

from __future__ import annotations

from typing import Final

MEMCG_LRUVEC: Final = "memcg_lruvec"  # mod_memcg_lruvec_state (6.13+): charges, frees, LRU moves
MEMCG_STATE: Final = "memcg_state"  # mod_memcg_state (6.13+): kernel memory, sockets
PAGE_FAULT_USER: Final = "page_fault_user"  # every user page fault (x86, BTF raw tracepoint)
OOM_VICTIM: Final = "oom_victim"  # mark_victim (6.8+): OOM kills, with the task they kill
# mm_page_alloc: a huge page (or mTHP folio) a metered thread faults in, counted at its size by the
# fault-counting meter (the fault hook sees one fault). Attached only beside page_fault_user and
# never with the memcg events, which see every charge at its size.
PAGE_ALLOC: Final = "page_alloc"

NAMES: Final = (MEMCG_LRUVEC, MEMCG_STATE, PAGE_FAULT_USER, PAGE_ALLOC, OOM_VICTIM)
MEMCG: Final = (MEMCG_LRUVEC, MEMCG_STATE)
# The set a kernel before 6.13 gets: no memcg stat tracepoints.
LEAN: Final = (PAGE_FAULT_USER, PAGE_ALLOC, OOM_VICTIM)

SETS: Final = {
    # One cheap event per fault (and a compare per page allocation) plus OOM kills; frees,
    # inactive_file and limit changes come from the upkeep. The set kernels before 6.13 get.
    "lean": LEAN,
    "fault": LEAN,  # the earlier name of the same set
    # Every memcg stat event (6.13+): charges, frees and LRU moves seen as they happen.
    "memcg": (MEMCG_LRUVEC, MEMCG_STATE, OOM_VICTIM),
    "all": NAMES,
}
