"""The model's measured speed: moving averages of decoding steps and prefill tokens."""

from __future__ import annotations

import pytest

from kv_runtime import Runtime
from kv_runtime.throughput import Throughput


def test_decoding_steps_and_prefill_tokens_are_averaged_apart() -> None:
    speed = Throughput(alpha=0.5)
    speed.observe(1, 0.2)  # a decoding step
    speed.observe(100, 1.0)  # a prefill chunk: 10 ms a token
    assert speed.seconds(0, 10) == pytest.approx(2.0)
    assert speed.seconds(300, 0) == pytest.approx(3.0)
    assert speed.seconds(300, 10) == pytest.approx(5.0)
    speed.observe(1, 0.4)  # halfway to the new value
    assert speed.seconds(0, 1) == pytest.approx(0.3)
    measured = speed.speed()
    assert measured.decode_tokens_per_s == pytest.approx(1 / 0.3)
    assert measured.prefill_tokens_per_s == pytest.approx(100.0)


def test_prefill_is_weighed_by_tokens() -> None:
    speed = Throughput(alpha=0.5)
    speed.observe(10, 0.3)  # a short prompt: 30 ms a token
    speed.observe(500, 2.5)  # a long chunk: 5 ms a token
    # (0.3 + 0.5 * (2.5 - 0.3)) / (10 + 0.5 * 490) = 1.4 / 255 s a token
    assert speed.seconds(255, 0) == pytest.approx(1.4)


def test_one_kind_stands_in_for_the_other_until_it_is_seen() -> None:
    assert Throughput().seconds(100, 100) == 0.0  # nothing seen yet
    decoded = Throughput()
    decoded.observe(1, 0.1)
    assert decoded.seconds(10, 0) == pytest.approx(1.0)  # a step per prompt token
    prefilled = Throughput()
    prefilled.observe(50, 0.5)
    assert prefilled.seconds(0, 10) == pytest.approx(0.1)


def test_a_loaded_runtime_has_measured_both_kinds_of_pass(runtime: Runtime) -> None:
    measured = runtime.throughput.speed()
    assert measured.prefill_tokens_per_s > 0 and measured.decode_tokens_per_s > 0
    before = runtime.throughput.seconds(0, 1)
    runtime.generate("Hello", max_tokens=4).collect()  # its passes are observed
    assert runtime.throughput.seconds(0, 1) != before
