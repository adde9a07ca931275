"""Admission control for generations: a bounded number at once, a short bounded wait queue.

A generation holds a slot from admission until it ends. It is admitted when fewer than
`max_active` run and its full-precision cache (`kv_bytes`: what the dequantized activation plus
prompt and answer will take) fits in what the running ones leave of `max_kv_bytes`, so the
dequantized caches in memory are bounded by bytes as well as by number. Otherwise it waits, in
arrival order, at most `wait_s` seconds and only if fewer than `max_waiting` already wait;
past that the answer is a refusal (429 in the API). Waiting checks `cancel` every 100 ms, so a
request whose client left stops waiting too.

Capacity is a normal outcome here: `acquire` returns a `Slot` or a `Refusal`, never raises.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class AdmissionLimits:
    max_active: int
    max_waiting: int
    wait_s: float
    max_kv_bytes: int


@dataclass(frozen=True)
class Refusal:
    reason: Literal["queue_full", "timed_out", "cancelled"]


@dataclass(frozen=True)
class AdmissionStats:
    active: int
    waiting: int
    kv_bytes: int  # reserved by the running generations
    refused: dict[str, int]  # reason -> count since start


class Slot:
    """A running generation's place; `release()` gives it back (once, whatever calls it)."""

    def __init__(self, gate: GenerationGate, kv_bytes: int) -> None:
        self._gate, self.kv_bytes = gate, kv_bytes
        self._released = False

    def release(self) -> None:
        self._gate._release(self)


class GenerationGate:
    def __init__(self, limits: AdmissionLimits) -> None:
        self.limits = limits
        self._lock = threading.Condition()
        self._active = 0
        self._kv_bytes = 0
        self._waiting: deque[object] = deque()
        self._refused: Counter[str] = Counter()

    def _fits(self, kv_bytes: int) -> bool:
        limits = self.limits
        return self._active < limits.max_active and (
            self._kv_bytes + kv_bytes <= limits.max_kv_bytes
        )

    def _admit(self, kv_bytes: int) -> Slot:
        self._active += 1
        self._kv_bytes += kv_bytes
        return Slot(self, kv_bytes)

    def acquire(self, kv_bytes: int, cancel: Callable[[], bool] = lambda: False) -> Slot | Refusal:
        """A slot for a generation whose cache will take `kv_bytes` (<= max_kv_bytes)."""
        assert kv_bytes <= self.limits.max_kv_bytes, "the caller refuses what can never fit"
        with self._lock:
            if not self._waiting and self._fits(kv_bytes):
                return self._admit(kv_bytes)
            if len(self._waiting) >= self.limits.max_waiting:
                return self._refuse("queue_full")
            me = object()
            self._waiting.append(me)
            deadline = time.monotonic() + self.limits.wait_s
            try:
                while True:
                    if self._waiting[0] is me and self._fits(kv_bytes):
                        return self._admit(kv_bytes)
                    if cancel():
                        return self._refuse("cancelled")
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return self._refuse("timed_out")
                    self._lock.wait(min(left, 0.1))
            finally:
                self._waiting.remove(me)
                self._lock.notify_all()  # the next in line may fit now

    def _release(self, slot: Slot) -> None:
        with self._lock:
            if slot._released:
                return
            slot._released = True
            self._active -= 1
            self._kv_bytes -= slot.kv_bytes
            self._lock.notify_all()

    def _refuse(self, reason: Literal["queue_full", "timed_out", "cancelled"]) -> Refusal:
        self._refused[reason] += 1
        return Refusal(reason)

    def stats(self) -> AdmissionStats:
        with self._lock:
            return AdmissionStats(
                self._active, len(self._waiting), self._kv_bytes, dict(self._refused)
            )
