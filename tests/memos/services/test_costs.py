"""The migrate job's cost model: load time against prefill time, from measured rates."""

from __future__ import annotations

import pytest

from memos.services.lifecycle import CostModel


def test_without_measurements_nothing_is_decided_and_caches_are_kept() -> None:
    unloaded = CostModel(lambda: None)
    verdict = unloaded.verdict(10_000_000, 10)
    assert (verdict.keep, verdict.why) == (True, "no load speed measured yet")
    unloaded.observe_load(1_000, 1.0)
    assert unloaded.verdict(1, 1).why == "no prefill speed measured yet"


def test_a_cache_is_kept_only_while_its_load_beats_its_prefill() -> None:
    costs = CostModel(lambda: 0.01)  # 10 ms a prefill token
    costs.observe_load(1_000_000, 0.010)  # 10 ns a byte
    assert costs.verdict(999_999, 1).keep  # 9.99999 ms to load < 10 ms to prefill
    dropped = costs.verdict(2_000_000, 1)  # 20 ms to load, 10 ms to prefill
    assert not dropped.keep
    assert dropped.why.startswith("loading its 2000000 bytes (~20.0 ms) costs more than")
    assert dropped.as_dict() == {"load_s": 0.02, "prefill_s": 0.01}


def test_load_speed_is_a_moving_average_unless_pinned() -> None:
    costs = CostModel(lambda: 1.0, alpha=0.5)
    costs.observe_load(100, 1.0)  # 0.01 s/byte
    costs.observe_load(100, 3.0)  # 0.03: the average moves half way
    assert costs.rates()["load_s_per_byte"] == pytest.approx(0.02)
    pinned = CostModel(lambda: 1.0, load_s_per_byte=0.5, learn=False)
    pinned.observe_load(100, 0.0)
    assert pinned.rates() == {"load_s_per_byte": 0.5, "prefill_s_per_token": 1.0}
