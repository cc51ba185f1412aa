"""Writes a directory as a gzip'd newc cpio archive (an initramfs) without the cpio tool.

    python3 scripts/mkcpio.py DIR OUT.cpio.gz
"""

import gzip
import os
import stat
import sys


def entries(root: str):
    yield "."
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(dirnames) + sorted(filenames):
            yield os.path.relpath(os.path.join(dirpath, name), root)


def header(ino: int, st: os.stat_result, name: bytes, size: int) -> bytes:
    fields = [ino, st.st_mode, 0, 0, 1, int(st.st_mtime), size, 0, 0, 0, 0, len(name) + 1, 0]
    return b"070701" + b"".join(b"%08X" % f for f in fields)


def pad(n: int) -> bytes:
    return b"\0" * ((4 - n % 4) % 4)


def main() -> None:
    root, out = sys.argv[1], sys.argv[2]
    buf = bytearray()
    for ino, rel in enumerate(entries(root), start=1):
        path = os.path.join(root, rel)
        st = os.lstat(path)
        data = b""
        if stat.S_ISREG(st.st_mode):
            with open(path, "rb") as f:
                data = f.read()
        elif stat.S_ISLNK(st.st_mode):
            data = os.readlink(path).encode()
        name = rel.encode()
        h = header(ino, st, name, len(data)) + name + b"\0"
        buf += h + pad(len(h)) + data + pad(len(data))
    trailer = b"070701" + b"%08X" % 0 * 11 + b"%08X" % 11 + b"%08X" % 0 + b"TRAILER!!!\0"
    buf += trailer + pad(len(trailer))
    with gzip.open(out, "wb", compresslevel=1) as f:
        f.write(bytes(buf))


if __name__ == "__main__":
    main()
