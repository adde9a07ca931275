"""The model's backlog: the work left of what was admitted, turned into seconds."""

from __future__ import annotations

import pytest

from memos.services.activations.backlog import Backlog


def estimate(prefill: int, decode: int) -> float:
    """A fixed speed: 10 ms a prefill token, 100 ms a decoding step."""
    return prefill * 0.01 + decode * 0.1


def test_the_work_left_of_each_item_adds_up() -> None:
    backlog = Backlog(chunk_tokens=128)
    generation = backlog.add(20, 8)
    build = backlog.add(300)
    assert backlog.ahead_s(estimate) == pytest.approx(0.2 + 0.8 + 3.0)
    generation.advance(20, 3)  # its prompt run, 3 tokens decoded
    build.advance(256)
    assert backlog.ahead_s(estimate) == pytest.approx(0.5 + 0.44)
    generation.done()
    generation.done()  # once
    assert len(backlog) == 1
    assert backlog.ahead_s(estimate) == pytest.approx(0.44)


def test_a_background_build_counts_for_one_chunk_at_most() -> None:
    """Interactive passes go first; a background build delays them by the chunk it may be
    running (see kv_runtime.turns), not by all of its work."""
    backlog = Backlog(chunk_tokens=128)
    build = backlog.add(1400, background=True)
    assert backlog.ahead_s(estimate) == pytest.approx(1.28)
    build.advance(1350)
    assert backlog.ahead_s(estimate) == pytest.approx(0.5)
    build.done()
    assert backlog.ahead_s(estimate) == 0.0
