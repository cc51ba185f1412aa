"""Pins live in a shared place (bpffs, often mode 1777 when something else mounted it): every
name the agent uses there is checked before use, never through a symlink, and must be a
directory owned by root that no one else may write. A planted name is refused with the path
and the fix; the agent never pins into (nor adopts from) a directory another user controls."""

from __future__ import annotations

import os
import stat

from ..errors import ConfigError


def _refuse(path: str, what: str) -> ConfigError:
    return ConfigError(f"pin path {path} {what}; another user may have planted it: remove it as root "
                       f"(rm -rf -- '{path}') and keep the bpffs at mode 0700 "
                       "(mount -o remount,mode=0700 /sys/fs/bpf), or pass another --pin-dir")


def check_parents(path: str) -> None:
    """Every existing ancestor of ``path``: a real directory (no symlink), owned by root, and
    writable by others only with the sticky bit (then others cannot replace our entries)."""
    parts = os.path.abspath(path).split(os.sep)[1:-1]
    current = ""
    for part in parts:
        current += os.sep + part
        try:
            st = os.lstat(current)
        except FileNotFoundError:
            return  # made by us, below checked ancestors
        if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
            raise _refuse(current, "is a symlink or not a directory")
        if st.st_uid != 0:
            raise _refuse(current, f"is owned by uid {st.st_uid}, not root")
        if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
            raise _refuse(current, f"is writable by others (mode {stat.S_IMODE(st.st_mode):o}) without the "
                                   "sticky bit")


def check_own(path: str) -> bool:
    """``path`` is absent (False) or a directory of ours (True); anything else is refused. Never
    follows a symlink (lstat; the caller creates with mkdir, which fails on a planted name)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    if stat.S_ISLNK(st.st_mode):
        raise _refuse(path, f"is a symlink (to {os.readlink(path)!r})")
    if not stat.S_ISDIR(st.st_mode):
        raise _refuse(path, "is not a directory")
    if st.st_uid != 0:
        raise _refuse(path, f"is owned by uid {st.st_uid}, not root")
    if st.st_mode & 0o022:
        raise _refuse(path, f"is writable by others (mode {stat.S_IMODE(st.st_mode):o})")
    return True


def check_tree(pin_dir: str) -> None:
    """Before adopting or replacing the pins: the pin directory, its maps/ and links/, and the
    staging name beside it, as :func:`check_own` wants them."""
    check_parents(pin_dir)
    for path in (pin_dir, os.path.join(pin_dir, "maps"), os.path.join(pin_dir, "links"), pin_dir + "-new"):
        check_own(path)


def make_dir(path: str) -> None:
    """mkdir, 0700, refusing a name that appeared meanwhile (mkdir never follows it)."""
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        raise _refuse(path, "appeared while the agent was making it") from None
