"""What the agent holds for whom: the watched cgroups' slots and the rules held on them.

A rule lives while a connection holds it (its lease). When the last holder leaves it lingers
(LINGER) before its index is lent to another rule, so a client that lost its connection still
reads the right word and one back soon finds it as it was. Rules adopted from a previous
agent's pins wait ADOPT_GRACE for their clients to come back. A cgroup is watched while the
scan wants it or a client holds a rule on it.

Only the loop (server.py) calls in here: nothing locks.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from .. import _cgroup
from .._rules import Rule
from ..ebpf import abi
from ..ebpf.slots import Slots, SlotState, decode_rule, encode_rule
from ..errors import CapacityError, RtmlError
from .conns import Conn, RuleKey
from .programs import NodePrograms
from .scan import Scanner

log = logging.getLogger("rtml_ebpf.agent")

LINGER = 5.0  # a rule whose last client left stays this long (a client back soon finds it as it was)
ADOPT_GRACE = 30.0  # rules adopted from pins wait this long for their clients to come back
WARM_PAGES = 4  # client pages made ahead for the lowest free slots (see page_to_warm)


@dataclass
class Held:
    """One rule of one cgroup and the connections holding it."""

    index: int
    leases: set[int] = field(default_factory=set)
    orphan_until: float = 0.0  # no lease (adopted, or its last client left): kept until then


class Leases:
    """The watched cgroups (from the scan and the clients) and their held rules."""

    def __init__(self, slots: Slots, node: NodePrograms, scanner: Scanner) -> None:
        self.slots = slots
        self.node = node
        self.scanner = scanner
        self.held: dict[int, dict[RuleKey, Held]] = {}  # cgroup id -> its rules
        self.refused: set[int] = set()  # cgroups logged as not watchable (capacity, nesting)
        slots.preferred = node.page_fds.keys()  # a new cgroup takes a free slot whose page is made
        self._warmed_at: tuple[int, int] = (-1, -1)  # (watched, pages) when every page to make was made

    def adopt(self, pin_dir: str | None) -> None:
        """A previous agent's pinned state: keep every watched cgroup that still exists, its
        rules held for ADOPT_GRACE so that its clients (reconnecting) find the same indices."""
        found = self.slots.adopt({cgid: self.scanner.cgroup_at(d) for cgid, d in self.scanner.present.items()})
        until = time.monotonic() + ADOPT_GRACE
        for cgid, rules in found.items():
            self.held[cgid] = {(r.kind, r.metric, r.trip, r.clear): Held(i, orphan_until=until)
                               for i, r in rules.items()}
            state = self.slots.by_cgid[cgid]
            for i, r in rules.items():
                state.rules[i] = decode_rule(r.kind, r.metric, r.trip, r.clear)
            if rules:
                self.node.page_fd(state.index, create=False)  # the page its clients still map
        log.info("rtml-ebpf agent: adopted %d watched cgroups (%d with rules) from %s", len(found),
                 sum(1 for r in found.values() if r), pin_dir)

    # -- cgroups ------------------------------------------------------------------------------
    def apply_scan(self) -> None:
        """The scanner's additions watched, its removals unwatched."""
        added, removed = self.scanner.changes()
        for f in added:
            if f.cgroup_id not in self.slots.by_cgid:
                self._watch(f.cgroup, f.cgroup_id)
        for cgid in removed:
            self.refused.discard(cgid)
            if cgid in self.slots.by_cgid:
                self.unwatch(cgid, "removed")

    def _watch(self, cg: _cgroup.MemoryCgroup, cgid: int) -> SlotState | None:
        try:
            state = self.slots.watch(cg)
        except CapacityError as exc:
            if cgid not in self.refused:
                self.refused.add(cgid)
                log.warning("rtml-ebpf agent: not watching %s: %s", cg.directory, exc)
            return None
        except (OSError, RtmlError) as exc:
            log.info("rtml-ebpf agent: cannot watch %s: %s", cg.directory, exc)
            return None
        self.refused.discard(cgid)
        log.info("rtml-ebpf agent: watching %s (id %d, slot %d)", cg.directory, cgid, state.index)
        return state

    def slot_for(self, cg: _cgroup.MemoryCgroup, cgid: int, pid: int) -> SlotState:
        """A client's cgroup (id ``cgid``): its slot, watched now if it was not (CapacityError
        says why not)."""
        state = self.slots.by_cgid.get(cgid)
        if state is None or not state.watched:
            state = self.slots.watch(cg)
            log.info("rtml-ebpf agent: watching %s (id %d, slot %d) for pid %d", cg.directory, cgid, state.index, pid)
        return state

    def page_to_warm(self) -> int | None:
        """One of the WARM_PAGES lowest free slots (the next ones a new cgroup takes) whose client
        page is not made yet, or None. The loop makes it between requests: installing a page in
        the programs' outer map waits for an RCU grace period (10–20 ms here), which a client's
        ``watch`` would otherwise wait for in its reply (issue 20: a process adopting the node's
        load builds its Limiter in ≤ 20 ms). A free slot's page is handed out only once the slot
        is the new cgroup's and published (``hold``)."""
        shape = (len(self.slots.by_cgid), len(self.node.page_fds))
        if shape == self._warmed_at:
            return None  # nothing taken or dropped since the last look found every page made
        used = {s.index for s in self.slots.by_cgid.values()}
        seen = 0
        for index in range(self.slots.capacity):
            if index in used:
                continue
            if index not in self.node.page_fds:
                return index
            seen += 1
            if seen == WARM_PAGES:
                break
        self._warmed_at = shape
        return None

    def unwatch(self, cgid: int, why: str) -> None:
        state = self.slots.unwatch_cgroup(cgid)
        if state is None:
            return
        self.node.drop_page(state.index)
        self.held.pop(cgid, None)
        log.info("rtml-ebpf agent: unwatched %s (%s)", state.cgroup.directory, why)

    def upkeep(self) -> None:
        """Cgroups with clients: limits written while idle (memcg events), or every reading
        (no memcg events), into their slots and pages."""
        for cgid, rules in self.held.items():
            state = self.slots.by_cgid.get(cgid)
            if state is None or not rules:
                continue
            try:
                if self.node.memcg_events:
                    if self.slots.check_limit(state.index, cgid):
                        self.node.publish(state.index)
                else:
                    self.slots.upkeep(state.index, cgid)
                    self.node.publish(state.index)
            except (OSError, RtmlError):
                pass  # removed meanwhile: the next scan unwatches it

    # -- rules and leases -----------------------------------------------------------------------
    def hold(self, state: SlotState, rule: Rule, conn_id: int) -> int:
        """``rule`` on ``state``'s cgroup, leased to ``conn_id``: its index (shared by every
        client asking the same rule)."""
        key: RuleKey = encode_rule(rule)
        rules = self.held.setdefault(state.cgroup_id, {})
        h = rules.get(key)
        if h is None:
            taken = {x.index for x in rules.values()}
            index = next((i for i in range(abi.MAX_RULES) if i not in taken), None)
            if index is None:
                raise CapacityError(
                    f"cgroup {state.cgroup.directory} already has {abi.MAX_RULES} distinct thresholds held by "
                    "clients; use one of theirs (the same threshold and hysteresis share one)")
            self.slots.set_rule(state, index, rule)
            h = rules[key] = Held(index)
            self.node.publish(state.index)
        h.leases.add(conn_id)
        h.orphan_until = 0.0
        return h.index

    def release(self, conn_id: int, conn: Conn) -> None:
        """The leases of a connection that closed (or failed its watch): its rules linger."""
        if self.node.thread_pages is not None:
            self.node.thread_pages.release(conn_id)  # its threads' meters go at once
        rules = self.held.get(conn.cgid, {})
        for key in conn.keys:
            h = rules.get(key)
            if h is not None:
                h.leases.discard(conn_id)
                if not h.leases:
                    # Not dropped at once: its index is not lent to another rule while a client
                    # that lost its connection may still read it, and a client back soon finds it.
                    h.orphan_until = time.monotonic() + LINGER
        conn.keys = []

    def expire_orphans(self, now: float) -> None:
        for cgid, rules in list(self.held.items()):
            for key, h in list(rules.items()):
                if h.orphan_until and now > h.orphan_until and not h.leases:
                    self._drop_rule(cgid, key)

    def _drop_rule(self, cgid: int, key: RuleKey) -> None:
        rules = self.held.get(cgid, {})
        h = rules.pop(key, None)
        state = self.slots.by_cgid.get(cgid)
        if h is None or state is None:
            return
        self.slots.set_rule(state, h.index, None)
        self.node.publish(state.index)
        if not rules and cgid not in self.scanner.wanted:
            self.unwatch(cgid, "its last client left")
