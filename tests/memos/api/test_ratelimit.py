"""The per-key rate limit over HTTP: 429 `rate_limited` with Retry-After, per key, /v1 only."""

from __future__ import annotations

import httpx
import pytest

from memos.services.ratelimit import RateLimiter
from memos.settings import RateLimitConfig


@pytest.fixture
def limited(server, monkeypatch):
    """Two requests per key, then one token every 100 s on a clock that stands still."""
    config = RateLimitConfig(requests_per_s=0.01, burst=2)
    monkeypatch.setattr(server.daemon, "rate_limiter", RateLimiter(config, clock=lambda: 0.0))
    return server


def test_a_key_past_its_burst_gets_429_with_retry_after(limited):
    _, a = limited.new_user()
    _, b = limited.new_user()
    with limited.client(a) as client:
        assert [client.get("/v1/cubes").status_code for _ in range(2)] == [200, 200]
        r = client.post("/v1/cubes", json={"name": "refused"})
        assert r.status_code == 429
        assert r.headers["Retry-After"] == "100"
        assert r.json()["error"]["code"] == "rate_limited"
        assert set(r.json()["error"]) == {"code", "message", "retry_after"}
        assert r.json()["error"]["retry_after"] == 100  # the header's seconds, in the body too
    with limited.client(b) as other:  # another key has its own bucket
        assert other.get("/v1/cubes").json()["items"] == []
    with limited.client(a) as client:
        assert client.get("/v1/cubes").status_code == 429


def test_health_metrics_and_unknown_keys_are_not_limited(limited):
    for _ in range(5):
        assert httpx.get(f"{limited.url}/healthz").status_code == 200
        assert httpx.get(f"{limited.url}/metrics").status_code == 200
    with limited.client("msk_unknown") as stranger:
        assert [stranger.get("/v1/cubes").status_code for _ in range(4)] == [401] * 4
    assert limited.daemon.rate_limiter._buckets == {}  # no bucket for a key that failed
