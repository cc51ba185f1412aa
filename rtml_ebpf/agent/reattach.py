"""Programs detached under a running agent come back. An agent that adopted pins holds no link
of its own: removing the pinned links (`rtml-ebpf agent --unload`, or a cleanup of the bpffs)
detaches its programs while it still serves, and the clients' verdicts would freeze. The loop
sees it (health.py, /readyz turns unready), and after DETACHED_GRACE attaches the same hooks
again on the same maps, held by the agent and pinned again where the pin directory is ours."""

from __future__ import annotations

import logging
import os

from ..ebpf import libbpf as _libbpf
from ..ebpf import probes
from ..ebpf.loader import OBJECT_PATH, open_load_attach
from ..errors import RtmlError
from . import pinsafe
from .programs import ALL_MAPS, NodePrograms, _sizer

log = logging.getLogger("rtml_ebpf.agent")

DETACHED_GRACE = 1.0  # seconds unready before attaching again (a restart in progress settles first)


class Reattacher:
    """From the loop's readiness look: how long the programs have been detached, and once past
    DETACHED_GRACE, :func:`reattach`."""

    def __init__(self, node: NodePrograms) -> None:
        self.node = node
        self.since = 0.0  # when the detached programs were first seen (0: all attached)

    def look(self, gone: list[str], now: float) -> None:
        if not gone:
            self.since = 0.0
        elif not self.since:
            self.since = now
            log.warning("rtml-ebpf agent: programs of %s are no longer attached (pins removed?); not ready",
                        ", ".join(gone))
        elif now - self.since >= DETACHED_GRACE:
            self.since = 0.0
            try:
                reattach(self.node, gone)
            except RtmlError as exc:
                log.warning("rtml-ebpf agent: cannot attach %s again: %s", ", ".join(gone), exc)


def reattach(node: NodePrograms, hooks: list[str]) -> None:
    """Load ``hooks``' programs again on the node's maps and attach them; LoadError or
    NotSupported says why not."""
    lib = _libbpf.lib()
    fds = {}
    for name in ALL_MAPS:
        m = _libbpf.check_ptr(lib.bpf_object__find_map_by_name(node.loaded.obj, name.encode()), "find map", name)
        fds[name] = _libbpf.check(lib.bpf_map__fd(m), "fd of map", name)  # libbpf's own: reuse dups it
    by_name = {h.name: h for h in probes.HOOKS}
    attach = {h: by_name[h].program for h in hooks if h in by_name}
    disable = tuple(h.program for h in probes.HOOKS if h.name not in attach)
    out = open_load_attach(OBJECT_PATH, attach, disable, _sizer(node.capacity, fds))  # type: ignore[arg-type]
    node.extra.append(out)
    node.loaded.prog_ids.update(out.prog_ids)
    for hook in out.links:
        node.prog_fds.pop(hook, None)  # run stats follow the new program
    pinned = ""
    if node.pin_dir is not None:
        links_dir = os.path.join(node.pin_dir, "links")
        try:
            pinsafe.check_parents(links_dir + "/x")
            if not pinsafe.check_own(links_dir):
                pinsafe.make_dir(links_dir)
            for hook, link in out.links.items():
                path = os.path.join(links_dir, hook)
                if not os.path.lexists(path):
                    _libbpf.check(lib.bpf_link__pin(link, path.encode()), "pin link", hook)
            pinned = f", pinned again under {links_dir}"
        except Exception as exc:  # noqa: BLE001 - attached and held by us is what matters
            pinned = f" (not pinned again: {exc})"
    log.warning("rtml-ebpf agent: programs of %s were detached under the agent; attached again%s",
                ", ".join(out.links) or "no hook", pinned)
