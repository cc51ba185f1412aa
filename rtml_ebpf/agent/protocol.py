"""The agent's Unix-socket protocol, shared by the agent and its clients.

One SOCK_SEQPACKET connection per watch: the client sends one JSON request; the agent decides
the cgroup from the connection's peer credentials (never from the request), answers one JSON
reply and, on success, passes two fds with it (SCM_RIGHTS): the cgroup's frozen page and the
node's beat page. The connection is the lease: the agent holds the client's rules while it
is open. Messages are at most MAX_MESSAGE bytes.

Request:  {"v": 1, "op": "watch", "scope": "self"|"pod", "rules": [RULE, ...]}
          {"v": 1, "op": "watch", "cgroup": DIRECTORY, "rules": [...]}   (root peers only: any
          memory cgroup, named by its directory as the agent sees it; refused for anyone else)
          {"v": 1, "op": "stats"}   (on a watching connection: the growth counters)
          {"v": 1, "op": "events", "scope": "self"|"pod"}   (a new connection: OOM kills)
          {"v": 1, "op": "wake", "level": N, "scope": "self"|"pod"}   (a new connection: the
          enforcer's wake; root may add "cgroup": DIRECTORY as in watch; then {"v": 1, "op":
          "wake", "level": N} on it moves the level; N bytes of use, 0 off)
RULE:     {"metric": "working_set"|"usage", "trip_ppm": N, "clear_ppm": N}
          or {"metric": ..., "trip_bytes": N, "clear_bytes": N}
Reply:    {"ok": true, "cgroup": path, "cgroup_id": N, "rules": [index, ...], "hooks": [...],
           "page_map_id": N, "abi": N, "upkeep": bool}   + fds [page, beat]
          {"ok": false, "error": "what was wrong and how to fix it"}

Events: the reply {"ok": true, "source": "bpf"|"memory.events", "scope": path, "note": text},
then one message per OOM kill seen in the scope (the fields of ``rtml_ebpf.oom.OomKill``) for
as long as the connection is open; root sees the node, anyone else its own cgroup (or pod).
An events connection only listens: any request on it is refused. A subscriber that does not
read loses records (counted in /metrics), never the agent's time.

Wake: the reply {"ok": true, "cgroup_id": N}, then one message per wake record of that cgroup
for as long as the connection is open: {"cgroup_id", "tid", "used", "level", "ns"}: its used
bytes reached the lowest level its clients asked for; "tid" is the charging thread in the
client's own pid namespace when it is one of the client's threads, else 0. The cgroup must be
watched (a watch connection first). A client that does not read loses records.

Every byte a client sends is hostile (the agent is root on every node): :func:`decode` takes
only a JSON object nested at most MAX_DEPTH deep, with no duplicate keys, whole numbers of at
most MAX_DIGITS digits, no non-finite numbers and no lone surrogates, and says which rule was
broken; it raises nothing but ConfigError.
"""

from __future__ import annotations

import json
from typing import Any, Final

from .._rules import METRICS, PPM, Rule, Threshold
from ..ebpf import hooks
from ..errors import ConfigError

VERSION = 1
# Hooks a watch reply's "hooks" may list that change what a client can read (ebpf/hooks.py).
OOM_HOOK: Final = hooks.OOM_VICTIM  # OOM kills counted by the programs (else memory.events)
FAULT_HOOK: Final = hooks.PAGE_FAULT_USER  # user page faults: the fault counter is live
DEFAULT_SOCKET = "/run/rtml-ebpf/agent.sock"
MAX_MESSAGE = 4096
MAX_PATH = 1024  # a cgroup directory a root client names (watch "cgroup")
MAX_RULES_PER_REQUEST = 2  # a Limiter's hard and soft levels
MAX_BYTES = 1 << 50
SCOPES = ("self", "pod")
MAX_DEPTH = 8  # a request is two levels deep (object, rules, rule): room to spare, no recursion
MAX_DIGITS = 20  # a number of the protocol fits in 64 bits


def encode(message: dict[str, Any]) -> bytes:
    data = json.dumps(message, separators=(",", ":")).encode()
    if len(data) > MAX_MESSAGE:
        raise ConfigError(f"agent message of {len(data)} bytes is over the {MAX_MESSAGE}-byte limit")
    return data


def _nesting(text: str) -> int:
    """The deepest nesting of ``text``'s arrays and objects (brackets inside strings do not
    count), found without recursion: json.loads recurses and a deep message is an attack."""
    depth = deepest = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            if depth > deepest:
                deepest = depth
                if deepest > MAX_DEPTH:
                    return deepest
        elif ch in "]}":
            depth -= 1
    return deepest


def _int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_DIGITS:
        raise ConfigError(f"number {text[:24]}... has over {MAX_DIGITS} digits")
    return int(text)


def _float(text: str) -> float:
    if len(text) > 64:
        raise ConfigError(f"number {text[:24]}... is over 64 characters")
    value = float(text)
    if value != value or value in (float("inf"), float("-inf")):
        raise ConfigError(f"number {text!r} is not finite")
    return value


def _constant(name: str) -> object:
    raise ConfigError(f"{name} is not a JSON number; send a finite number")


def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ConfigError(f"key {key!r} appears twice in one object")
        out[key] = value
    return out


def _check_strings(value: object) -> None:
    """Every string (keys too) must be valid Unicode: a lone surrogate (\\ud800) is not."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                raise ConfigError("a string holds a lone surrogate (\\ud800-\\udfff escape): send valid "
                                  "Unicode") from None
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def decode(data: bytes) -> dict[str, Any]:
    """A message, or ConfigError saying what is wrong with it (and never anything else)."""
    if len(data) > MAX_MESSAGE:
        raise ConfigError(f"message over {MAX_MESSAGE} bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"message is not JSON (not UTF-8: {exc.reason} at byte {exc.start})") from None
    if _nesting(text) > MAX_DEPTH:
        raise ConfigError(f"message nests deeper than {MAX_DEPTH} levels; a request is an object of rules")
    try:
        message = json.loads(text, parse_int=_int, parse_float=_float, parse_constant=_constant,
                             object_pairs_hook=_pairs)
    except ConfigError:
        raise
    except (ValueError, RecursionError, OverflowError, TypeError) as exc:
        raise ConfigError(f"message is not JSON ({str(exc)[:200]})") from None
    if not isinstance(message, dict):
        raise ConfigError("message must be a JSON object")
    _check_strings(message)
    return message


def wake_level(raw: object) -> int:
    """A wake op's level: whole bytes from 0 (off) to MAX_BYTES."""
    if isinstance(raw, bool) or not isinstance(raw, int) or not 0 <= raw <= MAX_BYTES:
        raise ConfigError(f"level={str(raw)[:40]!r}: the bytes of use at which to be woken, a whole number "
                          f"from 0 (off) to {MAX_BYTES}")
    return raw


def rule_to_wire(rule: Rule) -> dict[str, Any]:
    if rule.trip.nbytes is not None:
        return {"metric": rule.metric, "trip_bytes": rule.trip.nbytes, "clear_bytes": rule.clear.nbytes or 0}
    return {"metric": rule.metric, "trip_ppm": rule.trip.ppm, "clear_ppm": rule.clear.ppm}


def _whole(value: object, name: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ConfigError(f"rule {name}={value!r}: a whole number from {low} to {high}")
    return value


def rule_from_wire(raw: object) -> Rule:
    """A client's rule, checked: ConfigError names the field."""
    if not isinstance(raw, dict):
        raise ConfigError("each rule must be a JSON object")
    unknown = set(raw) - {"metric", "trip_ppm", "clear_ppm", "trip_bytes", "clear_bytes"}
    if unknown:
        raise ConfigError(f"unknown rule fields {sorted(unknown)}")
    metric = raw.get("metric")
    if metric not in METRICS:
        raise ConfigError(f"rule metric={metric!r}: one of {', '.join(METRICS)}")
    if "trip_ppm" in raw:
        trip = _whole(raw["trip_ppm"], "trip_ppm", 1, PPM)
        clear = _whole(raw.get("clear_ppm"), "clear_ppm", 0, trip)
        return Rule(metric, Threshold(ppm=trip), Threshold(ppm=clear))
    if "trip_bytes" in raw:
        trip = _whole(raw["trip_bytes"], "trip_bytes", 1, MAX_BYTES)
        clear = _whole(raw.get("clear_bytes"), "clear_bytes", 0, trip)
        return Rule(metric, Threshold(nbytes=trip), Threshold(nbytes=clear))
    raise ConfigError("a rule needs trip_ppm/clear_ppm or trip_bytes/clear_bytes")
