"""``rtml-ebpf watch``: the watched cgroups, live, the ones closest to their limit first.

Two sources, one row shape:

* the node agent: its ``/metrics`` (loopback by default), which already holds every watched
  cgroup's kernel readings, growth and pod labels: the view costs the node one scrape per
  refresh and works for any user who can reach the endpoint;
* standalone (``--cgroup DIR``, root): a Limiter per named cgroup on this process's own
  programs (the eBPF backend), with ``--threshold`` as the trip point shown and counted.
"""

from __future__ import annotations

import fnmatch
import json
import math
import re
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

from ._format import human
from .errors import AgentUnavailable, ConfigError

DEFAULT_AGENT = "http://127.0.0.1:9909/metrics"
MIN_INTERVAL, MAX_INTERVAL = 0.05, 60.0
BAR_WIDTH = 24
SCRAPE_TIMEOUT = 2.0


@dataclass(frozen=True)
class Row:
    """One cgroup as the view shows it. Bytes; None where the source has no figure."""

    cgroup: str
    usage_bytes: int
    working_set_bytes: int | None
    limit_bytes: int | None
    threshold_bytes: int | None
    headroom_bytes: int | None  # to the OOM killer's limit
    growth_bytes_per_s: float | None
    seconds_to_limit: float | None
    oom_kills: int
    trips: int
    pod_uid: str | None = None
    container_id: str | None = None
    qos: str | None = None
    high_bytes: int | None = None  # lowest memory.high on the path (v2)
    binding: str | None = None  # "max" or "high": what the threshold's fraction applies to
    pressure_some_avg10: float | None = None  # PSI some avg10, percent (None: no per-cgroup PSI)
    stalling: bool | None = None  # the agent's PSI trigger fired (agent) / some over 15% of 1 s (local)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def by_least_headroom(rows: Iterable[Row]) -> list[Row]:
    """Least room first; unlimited cgroups last, largest usage first among them."""
    return sorted(rows, key=lambda r: (r.headroom_bytes is None, r.headroom_bytes or 0, -r.usage_bytes))


def keep(rows: Iterable[Row], globs: tuple[str, ...]) -> list[Row]:
    return [r for r in rows if not globs or any(fnmatch.fnmatchcase(r.cgroup, g) for g in globs)]


# -- the agent's /metrics -------------------------------------------------------------------
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')
_FIELDS = {"rtml_cgroup_usage_bytes": "usage_bytes", "rtml_cgroup_working_set_bytes": "working_set_bytes",
           "rtml_cgroup_limit_bytes": "limit_bytes", "rtml_cgroup_headroom_bytes": "headroom_bytes",
           "rtml_cgroup_threshold_bytes": "threshold_bytes",
           "rtml_cgroup_growth_bytes_per_second": "growth_bytes_per_s",
           "rtml_cgroup_seconds_to_limit": "seconds_to_limit", "rtml_cgroup_oom_kills_total": "oom_kills",
           "rtml_cgroup_trips_total": "trips", "rtml_cgroup_high_bytes": "high_bytes",
           "rtml_cgroup_ceiling_bytes": "binding", "rtml_cgroup_pressure_avg10": "pressure_some_avg10",
           "rtml_cgroup_stalling": "stalling"}
_FLOATS = ("growth_bytes_per_s", "seconds_to_limit", "pressure_some_avg10")


def _unescape(value: str) -> str:
    return value.replace("\\n", "\n").replace('\\"', '"').replace("\\\\", "\\")


def parse_metrics(text: str) -> list[Row]:
    """The per-cgroup rows of the agent's exposition (other families are ignored)."""
    found: dict[str, dict[str, Any]] = {}
    label_sets: dict[str, dict[str, str]] = {}  # a cgroup's label text repeats in every family
    for line in text.splitlines():
        brace = line.find("{")
        field = _FIELDS.get(line[:brace]) if brace > 0 else None
        if field is None:
            continue  # other families (charges by kind: half the text), comments, agent health
        close = line.rfind("} ")
        if close < brace:
            continue
        label_text = line[brace + 1:close]
        labels = label_sets.get(label_text)
        if labels is None:
            labels = label_sets[label_text] = {k: _unescape(v) for k, v in _LABEL.findall(label_text)}
        cgroup = labels.get("cgroup")
        if cgroup is None:
            continue
        row = found.get(cgroup)
        if row is None:
            row = found[cgroup] = {"cgroup": cgroup, "pod_uid": labels.get("pod_uid") or None,
                                   "container_id": labels.get("container_id") or None,
                                   "qos": labels.get("qos") or None}
        value = float(line[close + 2:])
        if field == "binding":
            row[field] = labels.get("binding")
        elif field == "pressure_some_avg10":
            if labels.get("stall") == "some":
                row[field] = value
        elif field == "stalling":
            row[field] = bool(value)
        else:
            row[field] = value if field in _FLOATS else int(value)
    rows = []
    for r in found.values():
        if "usage_bytes" not in r:
            continue
        rows.append(Row(cgroup=r["cgroup"], usage_bytes=r["usage_bytes"], working_set_bytes=r.get("working_set_bytes"),
                        limit_bytes=r.get("limit_bytes"), threshold_bytes=r.get("threshold_bytes"),
                        headroom_bytes=r.get("headroom_bytes"), growth_bytes_per_s=r.get("growth_bytes_per_s"),
                        seconds_to_limit=r.get("seconds_to_limit"), oom_kills=r.get("oom_kills", 0),
                        trips=r.get("trips", 0), pod_uid=r["pod_uid"], container_id=r["container_id"], qos=r["qos"],
                        high_bytes=r.get("high_bytes"), binding=r.get("binding"),
                        pressure_some_avg10=r.get("pressure_some_avg10"), stalling=r.get("stalling")))
    return rows


class AgentSource:
    def __init__(self, url: str, token: str | None = None) -> None:
        if not url.startswith(("http://", "https://")):
            url = "http://" + url
        if not url.rstrip("/").endswith("/metrics"):
            url = url.rstrip("/") + "/metrics"
        self.url = url
        self.what = f"agent {url}"
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}

    def rows(self) -> list[Row]:
        try:
            with urllib.request.urlopen(urllib.request.Request(self.url, headers=self.headers),
                                        timeout=SCRAPE_TIMEOUT) as r:
                text = r.read().decode()
        except urllib.error.HTTPError as exc:
            why = exc.read().decode(errors="replace").strip()
            raise AgentUnavailable(f"{self.url} answered {exc.code}: {why}") from None
        except (urllib.error.URLError, OSError) as exc:
            raise AgentUnavailable(f"cannot read {self.url} ({getattr(exc, 'reason', exc)}); is `rtml-ebpf agent` "
                                   "running with --metrics-addr there? Or name cgroups with --cgroup to watch "
                                   "them standalone (root)") from None
        return parse_metrics(text)

    def close(self) -> None:
        pass


# -- standalone ---------------------------------------------------------------------------
class LocalSource:
    """A Limiter per named cgroup on this process's programs (eBPF)."""

    def __init__(self, directories: list[str], threshold: float | int, backend: str = "ebpf") -> None:
        from .limiter import Limiter

        self.limiters: list[Limiter] = []
        try:
            for d in directories:
                self.limiters.append(Limiter(d, threshold=threshold, backend=backend, relief=False))
        except BaseException:
            self.close()
            raise
        self.what = f"{len(self.limiters)} cgroup(s), {self.limiters[0].backend} backend of this process"

    def rows(self) -> list[Row]:
        from ._kube import pod_labels

        out = []
        for lim in self.limiters:
            s = lim.stats()
            pod = pod_labels(s.cgroup_path)
            out.append(Row(cgroup=s.cgroup_path, usage_bytes=s.usage_bytes, working_set_bytes=s.working_set_bytes,
                           limit_bytes=s.limit_bytes, threshold_bytes=s.threshold_bytes,
                           headroom_bytes=s.limit_headroom_bytes, growth_bytes_per_s=s.growth_bytes_per_s,
                           seconds_to_limit=s.seconds_to_limit, oom_kills=s.oom_kills, trips=s.trips,
                           pod_uid=pod.pod_uid if pod else None, container_id=pod.container_id if pod else None,
                           qos=pod.qos if pod else None, high_bytes=s.high_bytes, binding=s.binding,
                           pressure_some_avg10=s.pressure_some_avg10, stalling=s.stalling))
        return out

    def close(self) -> None:
        for lim in self.limiters:
            lim.close()
        self.limiters = []


# -- the view -----------------------------------------------------------------------------
def bar(row: Row, width: int = BAR_WIDTH) -> str:
    """Usage against the limit as rich markup: filled to usage, a ``|`` at the threshold."""
    if not row.limit_bytes:
        return "[dim]" + "·" * width + "[/dim]"
    used = row.working_set_bytes if row.working_set_bytes is not None else row.usage_bytes
    fill = min(width, int(width * row.usage_bytes / row.limit_bytes + 0.5))
    ws = min(fill, int(width * used / row.limit_bytes + 0.5))
    mark = None
    if row.threshold_bytes is not None:
        mark = min(width - 1, int(width * row.threshold_bytes / row.limit_bytes))
    cells = []
    for i in range(width):
        ch = "█" if i < ws else ("▒" if i < fill else "·")
        if i == mark:
            ch = "|"
        cells.append(ch)
    ratio = row.usage_bytes / row.limit_bytes
    color = "red" if ratio >= 0.9 or (row.threshold_bytes and used >= row.threshold_bytes) else (
        "yellow" if ratio >= 0.7 else "green")
    return f"[{color}]{''.join(cells)}[/{color}]"


def _seconds(value: float | None) -> str:
    if value is None or math.isinf(value):
        return "-"
    return f"{value:.1f} s" if value < 600 else f"{value / 60:.0f} min"


def _stall(row: Row) -> str:
    """PSI some avg10 in percent, red while stalling; "-" without per-cgroup PSI (cgroup v1)."""
    if row.pressure_some_avg10 is None:
        return "-"
    text = f"{row.pressure_some_avg10:.1f}%"
    return f"[red]{text}[/red]" if row.stalling else text


def common_parent(paths: list[str]) -> str:
    """The deepest cgroup above every path ("/" when none is shared), for shorter rows."""
    if len(paths) < 2:
        return "/"
    split = [p.strip("/").split("/") for p in paths]
    shared = []
    for parts in zip(*split, strict=False):
        if len(set(parts)) != 1:
            break
        shared.append(parts[0])
    shared = shared[: min(len(p) for p in split) - 1]  # keep at least one level of each row
    return "/" + "/".join(shared) if shared else "/"


_LONG_ID = re.compile(r"[0-9a-f]{32,}")
_POD_UID = re.compile(r"([0-9a-f]{8})[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{12}")


def short_name(path: str) -> str:
    """Container ids (64 hex digits) cut to the 12 that `crictl ps` shows, pod UIDs to 8
    (--once --json has them whole)."""
    return _POD_UID.sub(lambda m: m.group(1) + "…", _LONG_ID.sub(lambda m: m.group(0)[:12] + "…", path))


def table(rows: list[Row], what: str, max_rows: int | None = None) -> Any:
    from rich.table import Table

    top = common_parent([r.cgroup for r in rows])
    under = f" · under {top}" if top != "/" else ""
    t = Table(title=f"rtml-ebpf watch · {what}{under} · {time.strftime('%H:%M:%S')}", title_justify="left",
              caption="█ working set  ▒ rest of usage  | threshold · * the ceiling (max or memory.high) · stall: PSI "
                      "some avg10 · sorted by least headroom", caption_justify="left")
    for name, justify in (("cgroup", "left"), ("usage / limit", "left"), ("usage", "right"), ("working set", "right"),
                          ("limit", "right"), ("high", "right"), ("headroom", "right"), ("growth/s", "right"),
                          ("to limit", "right"), ("stall", "right"), ("OOM", "right"), ("trips", "right")):
        t.add_column(name, justify=justify, no_wrap=name != "cgroup", overflow="fold")  # type: ignore[arg-type]
    shown = rows if max_rows is None else rows[:max_rows]
    names = [short_name(r.cgroup[len(top):] if top != "/" else r.cgroup) for r in shown]
    t.columns[0].min_width = min(48, max((len(n) for n in names), default=6) + 12)
    for r, name in zip(shown, names, strict=True):
        if r.qos:
            name += f" [dim]({r.qos})[/dim]"
        growth = "-" if r.growth_bytes_per_s is None else f"{human(int(r.growth_bytes_per_s))}"
        t.add_row(name, bar(r), human(r.usage_bytes),
                  human(r.working_set_bytes) if r.working_set_bytes is not None else "-",
                  human(r.limit_bytes) + ("*" if r.binding == "max" and r.high_bytes is not None else ""),
                  "-" if r.high_bytes is None else human(r.high_bytes) + ("*" if r.binding == "high" else ""),
                  human(r.headroom_bytes) if r.headroom_bytes is not None else "-", growth,
                  _seconds(r.seconds_to_limit), _stall(r), f"[red]{r.oom_kills}[/red]" if r.oom_kills else "0",
                  str(r.trips))
    if max_rows is not None and len(rows) > max_rows:
        t.add_row(f"[dim]... {len(rows) - max_rows} more (filter with --filter)[/dim]", "", "", "", "", "", "", "",
                  "", "", "", "")
    return t


def run(agent: str | None, cgroups: list[str], globs: tuple[str, ...], interval: float, once: bool, as_json: bool,
        threshold: float | int, token_file: str | None = None) -> int:
    if not MIN_INTERVAL <= interval <= MAX_INTERVAL:
        raise ConfigError(f"--interval={interval:g}: seconds from {MIN_INTERVAL:g} to {MAX_INTERVAL:g} "
                          "(0.25 refreshes 4 times a second)")
    if as_json and not once:
        raise ConfigError("--json prints one reading: pass --once with it")
    if cgroups and agent:
        raise ConfigError("--agent reads the agent's cgroups, --cgroup watches cgroups standalone: pass one")
    token = None
    if token_file is not None:
        from .agent.metrics_access import read_token

        try:
            token = read_token(token_file)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"--token-file: {exc}") from None
    source: AgentSource | LocalSource = LocalSource(cgroups, threshold) if cgroups else \
        AgentSource(agent or DEFAULT_AGENT, token)
    try:
        if isinstance(source, LocalSource) and once:
            for _ in range(10):  # a second of readings for the growth rate
                source.rows()
                time.sleep(0.1)
        if once:
            rows = by_least_headroom(keep(source.rows(), globs))
            if as_json:
                print(json.dumps([r.as_dict() for r in rows], indent=2))
            else:
                _console().print(table(rows, source.what))
            return 0
        return _live(source, globs, interval)
    finally:
        source.close()


def _console() -> Any:
    """A terminal's width; piped into a file or a log, wide enough that rows do not fold."""
    from rich.console import Console

    return Console(width=None if sys.stdout.isatty() else 200)


class Fetcher:
    """Reads the source on its own thread, so a scrape (the agent renders it in its own process)
    overlaps the drawing of the previous frame: the view refreshes at the rate of the slower of
    the two, not of their sum."""

    def __init__(self, source: AgentSource | LocalSource, globs: tuple[str, ...], interval: float) -> None:
        import threading

        self.source, self.globs, self.interval = source, globs, interval
        self.rows: list[Row] | None = None
        self.error: BaseException | None = None
        self.fetches = 0
        self.at = 0.0  # time.monotonic() of the last reading
        self._stop = threading.Event()
        self._fresh = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rtml-watch-fetch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            t0 = time.monotonic()
            try:
                rows = by_least_headroom(keep(self.source.rows(), self.globs))
            except BaseException as exc:  # noqa: BLE001 - handed to the drawing thread
                self.error = exc
                self._fresh.set()
                return
            self.rows, self.at = rows, time.monotonic()
            self.fetches += 1
            self._fresh.set()
            # one reading per frame, not as many as the agent can render (each costs it a scrape)
            self._stop.wait(max(0.0, self.interval - (time.monotonic() - t0)))

    def wait(self, timeout: float) -> list[Row] | None:
        """The newest rows, waiting up to ``timeout`` for a reading newer than the last one drawn."""
        self._fresh.wait(timeout)
        self._fresh.clear()
        if self.error is not None:
            raise self.error
        return self.rows

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=SCRAPE_TIMEOUT * 2)


def _live(source: AgentSource | LocalSource, globs: tuple[str, ...], interval: float) -> int:
    from rich.live import Live

    console = _console()
    if not console.is_terminal:
        print("rtml-ebpf watch: not a terminal; use --once (--json) for scripts", file=sys.stderr)
    room = max(3, console.size.height - 9)
    fetcher = Fetcher(source, globs, interval)
    try:
        with Live(console=console, auto_refresh=False, screen=console.is_terminal) as live:
            draw(live, fetcher, source.what, interval, room)
    except KeyboardInterrupt:
        return 0  # Ctrl-C is how a live view ends
    finally:
        fetcher.stop()
    return 0


def draw(live: Any, fetcher: Fetcher, what: str, interval: float, room: int | None,
         frames: int | None = None) -> int:
    """Redraw every ``interval`` with the newest reading (``frames``: stop after that many).
    Returns the frames drawn."""
    drawn = 0
    while frames is None or drawn < frames:
        t0 = time.monotonic()
        rows = fetcher.wait(max(interval, 0.01))
        if rows is not None:
            age = time.monotonic() - fetcher.at
            label = what + (f" · data {age:.1f} s old" if age > max(1.0, 4 * interval) else "")
            live.update(table(rows, label, room), refresh=True)
            drawn += 1
        time.sleep(max(0.0, interval - (time.monotonic() - t0)))
    return drawn
