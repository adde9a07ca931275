"""The cost model `migrate` decides with: is loading a stored cache cheaper than prefilling its
text again?

CacheGen's controller (Liu et al. 2024, https://arxiv.org/abs/2310.07240) picks, per context,
the encoding level that meets a delay target, and falls back to sending the text (and
re-prefilling it) when loading the KV would take longer. memosd makes the same comparison for
what it keeps: a cache is worth keeping as KV only while

    load time   = stored bytes x seconds per byte to read, verify and dequantize them
    <  prefill time = context tokens x seconds per prefill token

Both rates are measured on this machine, as it is loaded now: prefill from the runtime's
moving average of its forward passes (`kv_runtime.Throughput`), loading from the loads
`migrate` itself does (every demotion reads and dequantizes the cache it re-quantizes). Until
a rate has been seen there is no evidence, and nothing is decided on it: caches are kept.

A test (or an operator studying a slow disk) gives the rates instead: `CostModel(prefill,
load_s_per_byte=..., learn=False)` decides with those numbers whatever it measures.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Verdict:
    keep: bool
    load_s: float | None  # estimated; None before any load was measured
    prefill_s: float | None  # estimated; None before the runtime ran a prefill
    why: str

    def as_dict(self) -> dict[str, Any]:
        return {
            "load_s": None if self.load_s is None else round(self.load_s, 6),
            "prefill_s": None if self.prefill_s is None else round(self.prefill_s, 6),
        }


class CostModel:
    """Load and prefill rates, and the verdict they give. Thread-safe."""

    def __init__(
        self,
        prefill_s_per_token: Callable[[], float | None],
        load_s_per_byte: float | None = None,
        *,
        learn: bool = True,
        alpha: float = 0.3,
    ) -> None:
        """`prefill_s_per_token`: the runtime's measured rate (None before it is loaded).
        `load_s_per_byte`: a rate to start from; `learn=False` keeps it whatever is observed."""
        self._prefill = prefill_s_per_token
        self._load = load_s_per_byte
        self.learn = learn
        self.alpha = alpha
        self._lock = threading.Lock()

    def observe_load(self, nbytes: int, seconds: float) -> None:
        """A stored cache of `nbytes` was read, verified and dequantized in `seconds`."""
        if not self.learn or nbytes <= 0 or seconds < 0:
            return
        rate = seconds / nbytes
        with self._lock:
            old = self._load
            self._load = rate if old is None else old + self.alpha * (rate - old)

    def rates(self) -> dict[str, float | None]:
        """For a run's result: the rates it decided with."""
        with self._lock:
            load = self._load
        return {"load_s_per_byte": load, "prefill_s_per_token": self._prefill()}

    def verdict(self, nbytes: int, tokens: int) -> Verdict:
        """Keep a cache of `nbytes` stored bytes over a context of `tokens` tokens?"""
        with self._lock:
            load_rate = self._load
        prefill_rate = self._prefill()
        load_s = None if load_rate is None else nbytes * load_rate
        prefill_s = None if prefill_rate is None else tokens * prefill_rate
        if load_s is None or prefill_s is None:
            missing = "load" if load_s is None else "prefill"
            return Verdict(True, load_s, prefill_s, f"no {missing} speed measured yet")
        if load_s >= prefill_s:
            why = (
                f"loading its {nbytes} bytes (~{load_s * 1000:.1f} ms) costs more than "
                f"prefilling its {tokens} tokens again (~{prefill_s * 1000:.1f} ms)"
            )
            return Verdict(False, load_s, prefill_s, why)
        why = f"loading (~{load_s * 1000:.1f} ms) beats re-prefilling (~{prefill_s * 1000:.1f} ms)"
        return Verdict(True, load_s, prefill_s, why)
