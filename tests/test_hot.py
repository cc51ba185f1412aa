"""The C hot-path check (rtml_ebpf/_hot.c): built by the install, reads the live byte, holds
its buffer, refuses misuse."""

from __future__ import annotations

import mmap

import pytest

from rtml_ebpf import Limiter
from rtml_ebpf._hot import Verdict  # the install builds it (setup.py): a failed build fails here


def test_reads_the_live_byte_and_indexes_like_a_flag() -> None:
    mm = mmap.mmap(-1, 4096)
    v = Verdict(memoryview(mm).cast("?")[7:8])
    assert v() is False and v[0] is False
    mm[7] = 1
    assert v() is True and v[0] is True
    mm[7] = 0
    assert v() is False
    with pytest.raises(IndexError):
        v[1]


def test_holds_the_mapping_open_and_refuses_misuse() -> None:
    mm = mmap.mmap(-1, 4096)
    v = Verdict(mm, 4095)
    with pytest.raises(BufferError):
        mm.close()  # a kept check can never read an unmapped page
    with pytest.raises(TypeError):
        v(1)  # type: ignore[call-arg]
    with pytest.raises(ValueError, match="outside"):
        Verdict(mm, 4096)
    with pytest.raises(TypeError):
        Verdict(object())
    v.watch = "held"
    assert v.watch == "held"
    del v
    mm.close()


def test_a_limiter_without_the_cache_still_binds_its_check_in_c(tmp_path: object) -> None:
    # the poll backend wraps its reading in a method; the kernel-fed backends bind a Verdict
    lim = Limiter(backend="poll", relief=False)
    try:
        assert not isinstance(lim.is_mem_limit_reached, Verdict)
    finally:
        lim.close()
