"""The per-key token bucket, on a clock the test moves by hand (no sleeping, no timing)."""

from __future__ import annotations

import pytest

from memcube.errors import TooManyRequests
from memos.services.ratelimit import RateLimiter
from memos.settings import RateLimitConfig


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_bucket_allows_a_burst_then_refills_at_the_rate():
    clock = Clock()
    limiter = RateLimiter(RateLimitConfig(requests_per_s=0.5, burst=2), clock)
    assert [limiter.wait_time("a") for _ in range(2)] == [0.0, 0.0]
    assert limiter.wait_time("a") == pytest.approx(2.0)  # one token takes 2 s at 0.5/s
    assert limiter.wait_time("a") == pytest.approx(2.0)  # a refused request takes nothing
    clock.now += 1.0
    assert limiter.wait_time("a") == pytest.approx(1.0)  # half a token there
    clock.now += 1.0
    assert limiter.wait_time("a") == 0.0
    clock.now += 60.0  # a long pause refills to the burst, no more
    assert [limiter.wait_time("a") for _ in range(3)] == [0.0, 0.0, pytest.approx(2.0)]


def test_keys_have_their_own_buckets():
    clock = Clock()
    limiter = RateLimiter(RateLimitConfig(requests_per_s=1, burst=1), clock)
    assert limiter.wait_time("a") == 0.0
    assert limiter.wait_time("a") == pytest.approx(1.0)
    assert limiter.wait_time("b") == 0.0


def test_check_raises_rate_limited_with_the_wait():
    limiter = RateLimiter(RateLimitConfig(requests_per_s=4, burst=1), Clock())
    limiter.check("a")
    with pytest.raises(TooManyRequests) as raised:
        limiter.check("a")
    assert raised.value.code == "rate_limited"
    assert raised.value.retry_after == pytest.approx(0.25)


def test_zero_rate_is_off():
    limiter = RateLimiter(RateLimitConfig(requests_per_s=0, burst=1), Clock())
    assert not limiter.enabled
    assert [limiter.wait_time("a") for _ in range(1000)] == [0.0] * 1000


def test_buckets_are_bounded_least_recently_used_out():
    clock = Clock()
    limiter = RateLimiter(RateLimitConfig(requests_per_s=1, burst=1, max_keys=2), clock)
    for key in ("a", "b"):
        assert limiter.wait_time(key) == 0.0
    assert limiter.wait_time("a") == pytest.approx(1.0)  # "a" is now the most recent
    assert limiter.wait_time("c") == 0.0  # evicts "b", the least recently used
    assert list(limiter._buckets) == ["a", "c"]
    assert limiter.wait_time("b") == 0.0  # back with a full bucket
    assert list(limiter._buckets) == ["c", "b"]
