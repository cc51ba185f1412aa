"""The agent's Unix-socket protocol, shared by the agent and its clients.

One SOCK_SEQPACKET connection per watch: the client sends one JSON request; the agent decides
the cgroup from the connection's peer credentials (never from the request), answers one JSON
reply and, on success, passes two fds with it (SCM_RIGHTS): the cgroup's frozen page and the
node's beat page. The connection is the lease: the agent holds the client's rules while it
is open. Messages are at most MAX_MESSAGE bytes.

Request:  {"v": 1, "op": "watch", "scope": "self"|"pod", "rules": [RULE, ...]}
          {"v": 1, "op": "stats"}   (on a watching connection: the growth counters)
RULE:     {"metric": "working_set"|"usage", "trip_ppm": N, "clear_ppm": N}
          or {"metric": ..., "trip_bytes": N, "clear_bytes": N}
Reply:    {"ok": true, "cgroup": path, "cgroup_id": N, "rules": [index, ...], "hooks": [...],
           "page_map_id": N, "abi": N, "upkeep": bool}   + fds [page, beat]
          {"ok": false, "error": "what was wrong and how to fix it"}
"""

from __future__ import annotations

import json
from typing import Any

from .._rules import METRICS, PPM, Rule, Threshold
from ..errors import ConfigError

VERSION = 1
DEFAULT_SOCKET = "/run/rtml-ebpf/agent.sock"
MAX_MESSAGE = 4096
MAX_RULES_PER_REQUEST = 2  # a Limiter's hard and soft levels
MAX_BYTES = 1 << 50
SCOPES = ("self", "pod")


def encode(message: dict[str, Any]) -> bytes:
    data = json.dumps(message, separators=(",", ":")).encode()
    if len(data) > MAX_MESSAGE:
        raise ConfigError(f"agent message of {len(data)} bytes is over the {MAX_MESSAGE}-byte limit")
    return data


def decode(data: bytes) -> dict[str, Any]:
    """A message, or ConfigError saying what is wrong with it."""
    if len(data) > MAX_MESSAGE:
        raise ConfigError(f"message over {MAX_MESSAGE} bytes")
    try:
        message = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ConfigError(f"message is not JSON ({exc})") from None
    if not isinstance(message, dict):
        raise ConfigError("message must be a JSON object")
    return message


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
