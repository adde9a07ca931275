"""Per-key request rate limit: a token bucket per API key digest.

Each key's bucket holds up to `burst` tokens and refills at `requests_per_s`; a request takes
one token or is refused with the time until the next token. Buckets live in memory (a daemon's
limit, not a cluster's) and at most `max_keys` are kept, least recently used first out: an
evicted bucket comes back full, which errs on the side of letting a request through.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from memcube.errors import TooManyRequests
from memos.settings import RateLimitConfig


@dataclass
class _Bucket:
    tokens: float
    updated: float  # clock reading of the last refill


class RateLimiter:
    def __init__(
        self, config: RateLimitConfig, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.config = config
        self._clock = clock
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.config.requests_per_s > 0

    def wait_time(self, key_digest: str) -> float:
        """Take a token for this key: 0.0 if one was there, else seconds until one will be
        (nothing is taken then)."""
        if not self.enabled:
            return 0.0
        rate, burst = self.config.requests_per_s, float(self.config.burst)
        now = self._clock()
        with self._lock:
            bucket = self._buckets.pop(key_digest, None) or _Bucket(tokens=burst, updated=now)
            bucket.tokens = min(burst, bucket.tokens + (now - bucket.updated) * rate)
            bucket.updated = now
            self._buckets[key_digest] = bucket  # most recently used last
            while len(self._buckets) > self.config.max_keys:
                self._buckets.popitem(last=False)
            if bucket.tokens >= 1.0:
                bucket.tokens -= 1.0
                return 0.0
            return (1.0 - bucket.tokens) / rate

    def check(self, key_digest: str) -> None:
        """`wait_time`, raising 429 `rate_limited` (with the wait) when there is one."""
        wait = self.wait_time(key_digest)
        if wait > 0:
            raise TooManyRequests(
                f"this API key is limited to {self.config.requests_per_s:g} requests per second "
                f"(bursts of {self.config.burst}); retry in {wait:.2f} s",
                code="rate_limited",
                retry_after=wait,
            )
