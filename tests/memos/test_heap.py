"""The process heap: arenas capped and freed memory given back, on glibc."""

from __future__ import annotations

import time

import pytest

from memos import heap

pytestmark = pytest.mark.skipif(not heap.available(), reason="glibc only")


def test_arenas_are_capped_and_zero_leaves_the_default() -> None:
    assert heap.limit_arenas(8) is True  # glibc's own cap on a 1-core machine: harmless here
    assert heap.limit_arenas(0) is False


def test_freed_memory_is_given_back() -> None:
    block = [bytearray(64 << 10) for _ in range(2000)]  # ~128 MiB in arena-sized pieces
    del block[::2]  # half of it free, in holes a heap cannot shrink past
    assert heap.trim() is True
    del block


def test_the_trimmer_runs_until_stopped() -> None:
    trimmer = heap.Trimmer(interval_s=0.01)
    trimmer.start()
    deadline = time.monotonic() + 60
    while trimmer.runs < 2:
        assert time.monotonic() < deadline, "the trimmer never ran"
        time.sleep(0.01)
    trimmer.stop()  # joins its thread: no run after it
    assert trimmer.runs >= 2 and trimmer.last_ms >= 0
