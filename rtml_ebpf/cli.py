"""``rtml-ebpf``: status of a memory cgroup as the limiter sees it, and the demo.

Exit codes: 0 ok, 2 bad arguments, 3 cgroup not found, 4 eBPF not supported
or not permitted, 5 a libbpf step failed, 1 anything else.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from typing import Any

from ._format import human
from .config import BACKENDS, env_hooks, env_settings, parse_threshold_text, threshold_value
from .ebpf import libbpf as _libbpf
from .errors import CgroupNotFound, ConfigError, LoadError, NotSupported, RtmlError
from .limiter import Limiter, Stats

EXIT_CODES: tuple[tuple[type[BaseException], int], ...] = (
    (ConfigError, 2),
    (CgroupNotFound, 3),
    (NotSupported, 4),
    (LoadError, 5),
    (RtmlError, 1),
)


def status_dict(s: Stats) -> dict[str, Any]:
    """Stable JSON keys for ``status --json`` (documented in the README)."""
    return {
        "cgroup_path": s.cgroup_path,
        "cgroup_dir": s.cgroup_dir,
        "cgroup_id": s.cgroup_id,
        "cgroup_version": s.cgroup_version,
        "limit_bytes": s.limit_bytes,
        "limit_source": s.limit_source,
        "usage_bytes": s.usage_bytes,
        "working_set_bytes": s.working_set_bytes,
        "metric": s.metric,
        "threshold_bytes": s.threshold_bytes,
        "headroom_bytes": s.headroom_bytes,
        "limit_headroom_bytes": s.limit_headroom_bytes,
        "tripped": s.tripped,
        "backend": s.backend,
        "backend_reason": s.backend_reason,
        "hooks": list(s.hooks),
        "oom_kills": s.oom_kills,
        "faults": s.faults,
        "updated_ns": s.updated_ns,
        "growth_bytes_per_s": s.growth_bytes_per_s,
        "seconds_to_limit": s.seconds_to_limit,
        "tripped_ahead": s.tripped_ahead,
    }


def print_status(s: Stats) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="rtml-ebpf status", show_header=False, title_justify="left")
    table.add_column("what", style="bold")
    table.add_column("value")
    pct = ""
    if s.limit_bytes:
        value = s.working_set_bytes if s.metric == "working_set" else s.usage_bytes
        pct = f"  ({100 * value / s.limit_bytes:.1f}% of limit)"
    rows = [
        ("cgroup", f"{s.cgroup_path}  (v{s.cgroup_version}, id {s.cgroup_id})"),
        ("directory", s.cgroup_dir),
        ("effective limit", human(s.limit_bytes) + (f"  set by {s.limit_source}" if s.limit_source else "")),
        ("memory.high", "none (cgroup v1 has no memory.high)" if s.cgroup_version == 1 else
         "none set" if s.high_bytes is None else human(s.high_bytes) + f"  set by {s.high_source}"),
        ("fractions of", {"high": "memory.high (below the limit: the kernel throttles there first)",
                          "max": "the limit"}.get(s.binding or "", "n/a (no limit)")),
        ("usage", human(s.usage_bytes)),
        ("working set", human(s.working_set_bytes) + "  (usage - inactive_file)"),
        ("metric", s.metric + pct),
        ("threshold", human(s.threshold_bytes) if s.threshold_bytes is not None else "n/a (no limit)"),
        ("headroom", (human(s.headroom_bytes) + " before the threshold") if s.headroom_bytes is not None else "n/a"),
        ("room before OOM", human(s.limit_headroom_bytes) if s.limit_headroom_bytes is not None else "n/a"),
        ("limit reached", "[red]YES[/red]" if s.tripped else "[green]no[/green]"),
        ("backend", s.backend),
        ("why", s.backend_reason),
        ("OOM kills", str(s.oom_kills)),
    ]
    if s.faults is not None:
        rows.append(("user faults seen", str(s.faults)))
    rows.append(("memory pressure", f"some {s.pressure_some_avg10:.2f}% full {s.pressure_full_avg10:.2f}% (avg10)"
                 + ("  [red]stalling[/red]" if s.stalling else "") if s.pressure_some_avg10 is not None
                 and s.pressure_full_avg10 is not None else f"n/a: {s.pressure_reason}"))
    if s.growth_bytes_per_s is not None:
        rows.append(("growth", f"{human(int(s.growth_bytes_per_s))}/s" + (
            f", limit in {s.seconds_to_limit:.1f} s at this rate" if s.seconds_to_limit is not None else "")))
    for k, v in rows:
        table.add_row(k, v)
    Console().print(table)


def cmd_status(args: argparse.Namespace) -> int:
    if args.threshold is not None:
        threshold = threshold_value(parse_threshold_text(args.threshold, name="--threshold"))
    else:  # the variable a service would be started with, so status shows what it will do
        threshold = env_settings().threshold or 0.9
    env_hooks()  # a bad RTML_HOOKS is an error here, not eBPF quietly skipped
    with Limiter(args.cgroup, pid=args.pid, threshold=threshold, metric=args.metric, backend=args.backend) as lim:
        s = lim.stats()
    if args.json:
        print(json.dumps(status_dict(s), indent=2))
    else:
        print_status(s)
    return 0


def cmd_agent(args: argparse.Namespace) -> int:
    from .agent.programs import DEFAULT_PIN_DIR, check_capacity, remove_pins
    from .agent.server import Agent, AgentConfig
    from .config import parse_hooks

    logging.getLogger("rtml_ebpf").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    pin_dir = None if args.no_pin else (args.pin_dir or DEFAULT_PIN_DIR)
    if args.unload:
        if pin_dir is None:
            raise ConfigError("--unload removes the pinned programs: do not pass --no-pin with it")
        remove_pins(pin_dir)
        print(f"rtml-ebpf: removed the pins under {pin_dir}; the programs detach when no agent holds them")
        return 0
    try:
        mode = int(args.socket_mode, 8)
    except ValueError:
        raise ConfigError(f"--socket-mode={args.socket_mode!r}: an octal mode such as 0666") from None
    config = AgentConfig(socket_path=args.socket, capacity=check_capacity(args.max_cgroups),
                         globs=tuple(args.watch or ()), pin_dir=pin_dir,
                         hooks=parse_hooks(args.hooks, name="--hooks"), socket_mode=mode,
                         metrics_addr=None if args.metrics_addr in ("", "off") else args.metrics_addr,
                         metrics_token_file=args.metrics_token_file)
    agent = Agent(config)
    try:
        agent.serve_forever()
    finally:
        agent.close(unpin=False)
    return 0


def cmd_events(args: argparse.Namespace) -> int:
    from . import events
    from .backends.agent import socket_path

    return events.run(args.source, args.socket or socket_path(), args.scope, tuple(args.cgroup or ()), args.count,
                      args.timeout)


def cmd_watch(args: argparse.Namespace) -> int:
    from . import watch

    threshold = threshold_value(parse_threshold_text(args.threshold, name="--threshold"))
    return watch.run(args.agent, list(args.cgroup or ()), tuple(args.filter or ()), args.interval, args.once,
                     args.json, threshold, args.token_file)


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(args)


# -- argument types: a bad value is argparse's error (exit 2, the message, the usage), never a
# traceback later. Each bounds what the command can use (setitimer overflows past ~10^8 s).
MAX_SECONDS = 86400.0 * 365
PID_MAX = 1 << 22  # the kernel's limit for pid_max


def _number(text: str, kind: type[int] | type[float], low: float, high: float, what: str) -> Any:
    try:
        if not text.isascii():  # int() reads other scripts' digits: "١٢" would be 12
            raise ValueError(text)
        value = kind(text.strip())
    except (ValueError, OverflowError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number; pass {what}") from None
    if not low <= value <= high:  # False for nan as well
        raise argparse.ArgumentTypeError(f"{text!r} is out of range; pass {what}")
    return value


def seconds(text: str) -> float:
    return float(_number(text, float, 1e-3, MAX_SECONDS, f"seconds from 0.001 to {MAX_SECONDS:.0f}"))


def count(text: str) -> int:
    return int(_number(text, int, 1, 1 << 31, "a whole number of at least 1"))


def pid(text: str) -> int:
    return int(_number(text, int, 1, PID_MAX, f"a process id from 1 to {PID_MAX}"))


def cgroups_capacity(text: str) -> int:
    return int(_number(text, int, 1, 1 << 20, "a whole number of cgroups from 1 to 1048576"))


def threshold_text(text: str) -> str:
    try:
        parse_threshold_text(text, name="--threshold")
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def octal_mode(text: str) -> str:
    try:
        mode = int(text, 8)
    except ValueError:
        mode = -1
    if not 0 <= mode <= 0o7777:
        raise argparse.ArgumentTypeError(f"{text!r}: an octal file mode such as 0666")
    return text


def host_port(text: str) -> str:
    if text in ("", "off"):
        return text
    import ipaddress

    host, sep, port = text.rpartition(":")
    inner = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        v6 = bool(ipaddress.IPv6Address(inner))
    except ValueError:
        v6 = False
    if not sep or not host or not text.isascii() or not port.isdigit() or int(port) > 65535 or \
            (any(c in host for c in ":[]") and not v6):
        raise argparse.ArgumentTypeError(f"{text!r}: HOST:PORT (e.g. 127.0.0.1:9909, [::1]:9909), or 'off'")
    return text


def metrics_url(text: str) -> str:
    """An http(s) URL, or HOST:PORT (taken as http://HOST:PORT/metrics, as watch reads it)."""
    from urllib.parse import urlsplit

    url = text if text.startswith(("http://", "https://")) else "http://" + text
    if url is not text and (not text.isascii() or not text.rpartition(":")[2].isdigit()):
        raise argparse.ArgumentTypeError(f"{text!r}: an http(s) URL such as http://127.0.0.1:9909/metrics, "
                                         "or HOST:PORT")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not a URL ({exc})") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise argparse.ArgumentTypeError(f"{text!r}: an http(s) URL such as http://127.0.0.1:9909/metrics, "
                                         "or HOST:PORT")
    return text


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rtml-ebpf", description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("-v", "--verbose", action="store_true", help="log libbpf output (verifier logs included)")
    sub = p.add_subparsers(dest="command", required=True)

    st = sub.add_parser("status", help="show a memory cgroup as the limiter sees it")
    who = st.add_mutually_exclusive_group()
    who.add_argument("--cgroup", metavar="PATH", help="a memory cgroup directory (default: this process's)")
    who.add_argument("--pid", type=pid, help="the memory cgroup of this process")
    st.add_argument("--json", action="store_true", help="machine-readable output with stable keys")
    st.add_argument("--threshold", type=threshold_text, default=None,
                    help="fraction (0.9, 90%%) or size (512Mi); default $RTML_THRESHOLD, else 0.9")
    st.add_argument("--metric", default="working_set", choices=("working_set", "usage"))
    st.add_argument("--backend", default="auto", choices=BACKENDS)
    st.set_defaults(func=cmd_status)

    from .agent.programs import DEFAULT_PIN_DIR
    from .agent.protocol import DEFAULT_SOCKET

    ag = sub.add_parser("agent", help="the node agent (root): load once, serve unprivileged clients their verdicts")
    ag.add_argument("--socket", default=DEFAULT_SOCKET, help=f"the Unix socket to serve (default {DEFAULT_SOCKET})")
    ag.add_argument("--socket-mode", type=octal_mode, default="0666",
                    help="its file mode (default 0666: identity comes from the kernel's peer credentials, not from "
                         "the file's permissions)")
    ag.add_argument("--max-cgroups", type=cgroups_capacity, default=4096,
                    help="watched cgroups the programs can hold (default 4096)")
    ag.add_argument("--watch", action="append", metavar="GLOB",
                    help="watch the cgroups whose path matches (e.g. '/kubepods*'); repeatable. Default: every "
                         "memory cgroup with a limit")
    ag.add_argument("--hooks", default="auto", help="auto (default), lean, memcg, fault or all (see RTML_HOOKS)")
    ag.add_argument("--pin-dir", default=None, help=f"bpffs directory for pins (default {DEFAULT_PIN_DIR}); a "
                    "restarted agent adopts them with no gap")
    ag.add_argument("--metrics-addr", type=host_port, default="127.0.0.1:9909", metavar="HOST:PORT",
                    help="serve Prometheus /metrics of every watched cgroup here (default 127.0.0.1:9909, "
                         "loopback only; 'off' to disable; port 0 picks one and logs it)")
    ag.add_argument("--metrics-token-file", default=None, metavar="PATH",
                    help="a bearer token scrapers must send (Authorization: Bearer ...); needed to serve /metrics "
                         "beyond loopback. Without it only root on loopback may read them")
    ag.add_argument("--no-pin", action="store_true", help="do not pin: the programs go when the agent stops")
    ag.add_argument("--unload", action="store_true", help="remove the pins (the programs detach) and exit")
    ag.set_defaults(func=cmd_agent)

    ev = sub.add_parser("events", help="OOM kills as JSON lines (pid, comm, cgroup, pod, usage, limit, victim RSS)")
    ev.add_argument("--source", default="auto", choices=("auto", "agent", "standalone"),
                    help="agent: from the node agent (root sees every cgroup, others their own); standalone: "
                         "load programs here (root); auto (default): the agent when its socket is there")
    ev.add_argument("--socket", default=None, help=f"the agent's socket (default $RTML_AGENT_SOCKET or "
                    f"{DEFAULT_SOCKET})")
    ev.add_argument("--scope", default="self", choices=("self", "pod"),
                    help="non-root through the agent: your own cgroup (default) or your pod")
    ev.add_argument("--cgroup", action="append", metavar="GLOB",
                    help="only cgroups whose path matches (e.g. '/kubepods*'); repeatable")
    ev.add_argument("--count", type=count, default=None, help="exit after this many records")
    ev.add_argument("--timeout", type=seconds, default=None, help="exit after this many seconds")
    ev.set_defaults(func=cmd_events)

    wa = sub.add_parser("watch", help="live view of the watched cgroups, least headroom first (the agent's, or "
                        "--cgroup ones standalone)")
    wa.add_argument("--agent", type=metrics_url, default=None, metavar="URL",
                    help="the agent's metrics endpoint (default http://127.0.0.1:9909/metrics)")
    wa.add_argument("--token-file", default=None, metavar="PATH",
                    help="the agent's metrics token (its --metrics-token-file), sent as a bearer token")
    wa.add_argument("--cgroup", action="append", metavar="DIR",
                    help="watch this cgroup directory standalone with programs of this process (root); repeatable")
    wa.add_argument("--filter", action="append", metavar="GLOB",
                    help="only cgroups whose path matches (e.g. '/kubepods*'); repeatable")
    wa.add_argument("--interval", type=seconds, default=0.25, help="seconds between refreshes (default 0.25: 4 Hz)")
    wa.add_argument("--once", action="store_true", help="print one reading and exit")
    wa.add_argument("--json", action="store_true", help="with --once: the rows as JSON (stable keys)")
    wa.add_argument("--threshold", type=threshold_text, default="0.9",
                    help="standalone: the trip point shown and counted (default 0.9)")
    wa.set_defaults(func=cmd_watch)

    from .demo import add_arguments

    dm = sub.add_parser("demo", help="flood a service in a memory cgroup: unguarded, poll-guarded, eBPF-guarded")
    add_arguments(dm)
    dm.set_defaults(func=cmd_demo)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(message)s")
    _libbpf.set_verbose(args.verbose)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        for kind, code in EXIT_CODES:
            if isinstance(exc, kind):
                print(f"rtml-ebpf: {exc}", file=sys.stderr)
                return code
        raise


if __name__ == "__main__":
    sys.exit(main())
