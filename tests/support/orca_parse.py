"""A strict reader of ORCA load reports, written from the format's definition, not from our
writer: the xds.data.orca.v3.OrcaLoadReport message (field numbers, types, validation rules)
and the `endpoint-load-metrics` header forms Envoy reads (a "TEXT ", "JSON " or "BIN " prefix;
TEXT: comma-separated name=value pairs, optional whitespace around each, no name twice).

Anything outside the definition is an error: an unknown name, a duplicate, a value that is
not a finite non-negative decimal, a utilization above 1 where the message caps it, a field
of the wrong wire type.
"""

from __future__ import annotations

import base64
import json
import math
import re
import struct

# name -> (field number, upper bound or None)
SCALARS = {
    "cpu_utilization": (1, None),
    "mem_utilization": (2, 1.0),
    "rps_fractional": (6, None),
    "eps": (7, None),
    "application_utilization": (9, None),
}
MAPS = {"request_cost": (4, None), "utilization": (5, 1.0), "named_metrics": (8, None)}
DECIMAL = re.compile(r"[0-9]+(\.[0-9]+)?([eE][-+]?[0-9]+)?")


class OrcaError(ValueError):
    pass


def _check(name: str, value: float, bound: float | None) -> float:
    if not math.isfinite(value) or value < 0:
        raise OrcaError(f"{name}: {value!r} is not a finite non-negative number")
    if bound is not None and value > bound:
        raise OrcaError(f"{name}: {value!r} is above {bound}")
    return value


def _set(report: dict[str, object], name: str, value: float) -> None:
    if "." in name:
        field, key = name.split(".", 1)
        if field not in MAPS or not key:
            raise OrcaError(f"unknown metric {name!r}")
        entries = report.setdefault(field, {})
        assert isinstance(entries, dict)
        entries[key] = _check(name, value, MAPS[field][1])
    elif name in SCALARS:
        report[name] = _check(name, value, SCALARS[name][1])
    else:
        raise OrcaError(f"unknown metric {name!r}")


def parse_text(body: str) -> dict[str, object]:
    report: dict[str, object] = {}
    seen: set[str] = set()
    for token in body.split(","):
        token = token.strip(" \t")
        name, sep, value = token.partition("=")
        if not sep or not name or not value:
            raise OrcaError(f"{token!r} is not name=value")
        if name in seen:
            raise OrcaError(f"duplicate metric {name!r}")
        seen.add(name)
        if not DECIMAL.fullmatch(value):
            raise OrcaError(f"{name}: {value!r} is not a decimal number")
        _set(report, name, float(value))
    return report


def parse_json(body: str) -> dict[str, object]:
    obj = json.loads(body, parse_constant=lambda c: (_ for _ in ()).throw(OrcaError(f"{c} in JSON")))
    if not isinstance(obj, dict):
        raise OrcaError("the JSON form is an object")
    report: dict[str, object] = {}
    for name, value in obj.items():
        if name in MAPS:
            if not isinstance(value, dict):
                raise OrcaError(f"{name} is a map")
            for key, v in value.items():
                if isinstance(v, bool) or not isinstance(v, (int, float)):
                    raise OrcaError(f"{name}.{key}: {v!r} is not a number")
                _set(report, f"{name}.{key}", float(v))
        elif name in SCALARS:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise OrcaError(f"{name}: {value!r} is not a number")
            _set(report, name, float(value))
        else:
            raise OrcaError(f"unknown field {name!r}")
    return report


def _varint(data: bytes, i: int) -> tuple[int, int]:
    shift = value = 0
    while True:
        if i >= len(data) or shift > 63:
            raise OrcaError("truncated varint")
        b = data[i]
        i += 1
        value |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return value, i


def parse_binary(data: bytes) -> dict[str, object]:
    by_number = {num: (name, bound) for name, (num, bound) in SCALARS.items()}
    maps = {num: name for name, (num, _) in MAPS.items()}
    report: dict[str, object] = {}
    i = 0
    while i < len(data):
        tag, i = _varint(data, i)
        number, wire = tag >> 3, tag & 7
        if number in by_number:
            if wire != 1 or i + 8 > len(data):
                raise OrcaError(f"field {number}: not a double")
            (value,) = struct.unpack_from("<d", data, i)
            i += 8
            _set(report, by_number[number][0], value)
        elif number == 3 and wire == 0:
            _, i = _varint(data, i)  # rps (deprecated uint64)
        elif number in maps and wire == 2:
            size, i = _varint(data, i)
            entry, i = data[i:i + size], i + size
            key, value = _map_entry(entry)
            _set(report, f"{maps[number]}.{key}", value)
        else:
            raise OrcaError(f"unknown field {number} (wire type {wire})")
    return report


def _map_entry(entry: bytes) -> tuple[str, float]:
    key, value, j = "", 0.0, 0
    while j < len(entry):
        tag, j = _varint(entry, j)
        if tag == 0x0A:
            n, j = _varint(entry, j)
            key, j = entry[j:j + n].decode(), j + n
        elif tag == 0x11:
            (value,) = struct.unpack_from("<d", entry, j)
            j += 8
        else:
            raise OrcaError(f"map entry: unknown tag {tag}")
    return key, value


def parse_header(value: str | bytes) -> dict[str, object]:
    """The value of an `endpoint-load-metrics` header, in any of its three forms."""
    text = value.decode("ascii") if isinstance(value, bytes) else value
    if text.startswith("TEXT "):
        return parse_text(text[5:])
    if text.startswith("JSON "):
        return parse_json(text[5:])
    if text.startswith("BIN "):
        return parse_binary(base64.b64decode(text[4:], validate=True))
    raise OrcaError(f"unknown form {text[:5]!r}: TEXT, JSON or BIN")
