"""`Throughput`: how fast the model runs now, as moving averages of what it was seen to do.

Every forward pass reports its tokens and the seconds it ran (not the time it waited for the
lock). One-token passes are decoding steps; longer ones are prefill. Two moving averages follow
them: seconds per decoding step, and seconds per prefill token (the ratio of the averages of
seconds and of tokens, so long chunks weigh as much as their tokens). They follow the machine as
it is now, load from other processes and the daemon's other threads included, which is what an
admission decision needs: `seconds(prefill, decode)` turns a request's tokens into an estimate.

Before a pass of one kind has been seen, the other kind's rate stands in for it (a decoding
step per prefill token is pessimistic); before any pass at all the estimate is 0. `Runtime.load`
warms up with one pass of each kind, so a loaded runtime always has both.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass


@dataclass(frozen=True)
class Speed:
    """For /metrics: the current averages (0 before any pass of the kind)."""

    prefill_tokens_per_s: float
    decode_tokens_per_s: float


class Throughput:
    """Thread-safe moving averages; `alpha` is each new pass's weight."""

    def __init__(self, alpha: float = 0.1) -> None:
        assert 0 < alpha <= 1, "alpha is a weight in (0, 1]"
        self.alpha = alpha
        self._lock = threading.Lock()
        self._step_s: float | None = None  # a decoding step
        self._prefill_s: float | None = None  # a prefill pass
        self._prefill_tokens: float | None = None  # its tokens

    def observe(self, tokens: int, seconds: float) -> None:
        """One forward pass of `tokens` that ran for `seconds`."""
        if tokens <= 0 or seconds < 0:
            return
        with self._lock:
            if tokens == 1:
                self._step_s = self._mix(self._step_s, seconds)
            else:
                self._prefill_s = self._mix(self._prefill_s, seconds)
                self._prefill_tokens = self._mix(self._prefill_tokens, float(tokens))

    def _mix(self, average: float | None, value: float) -> float:
        return value if average is None else average + self.alpha * (value - average)

    def _rates(self) -> tuple[float, float]:
        """(seconds per prefill token, seconds per decoding step); the lock is held."""
        token_s = (
            self._prefill_s / self._prefill_tokens
            if self._prefill_s is not None and self._prefill_tokens
            else None
        )
        step_s = self._step_s
        if token_s is None:
            token_s = step_s or 0.0
        if step_s is None:
            step_s = token_s
        return token_s, step_s

    def seconds(self, prefill_tokens: int, decode_tokens: int) -> float:
        """Estimated model time of prefilling `prefill_tokens` and decoding `decode_tokens`."""
        with self._lock:
            token_s, step_s = self._rates()
        return max(0, prefill_tokens) * token_s + max(0, decode_tokens) * step_s

    def speed(self) -> Speed:
        with self._lock:
            token_s, step_s = self._rates()
        return Speed(1 / token_s if token_s else 0.0, 1 / step_s if step_s else 0.0)
