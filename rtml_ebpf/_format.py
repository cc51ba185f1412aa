"""How figures are written for people (the CLI, the live view, the demo)."""

from __future__ import annotations


def human(n: int | None) -> str:
    """Bytes as 1.5 MiB; None as "unlimited"."""
    if n is None:
        return "unlimited"
    sign = "-" if n < 0 else ""
    v = float(abs(n))
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if v < 1024 or unit == "TiB":
            return f"{sign}{v:.0f} {unit}" if unit == "B" else f"{sign}{v:.1f} {unit}"
        v /= 1024
    return f"{n} B"
