"""Reading `strace -f` output: the marker syscalls a test brackets its loop with."""

from __future__ import annotations

import re

# getppid() as the marker: complete, or split by strace when another thread's syscall interleaved
# ("getppid( <unfinished ...>" here, "<... getppid resumed>" later: the start is the marker).
_MARKER = re.compile(r"\bgetppid\((\)| <unfinished)")


def marker_lines(lines: list[str]) -> list[int]:
    """Indices of the lines where a getppid() marker starts."""
    return [i for i, line in enumerate(lines) if _MARKER.search(line)]


def syscalls_between(lines: list[str], start: int, end: int, tid: str) -> list[str]:
    """The syscalls of thread ``tid`` between two marker lines (the first marker's own resumption,
    when strace split it, is not one)."""
    return [line for line in lines[start + 1 : end]
            if line.split()[0] == tid and "<... getppid resumed>" not in line]
