"""Admission control for generations: bounded by the work ahead, by number and by bytes.

A generation holds a slot (and its `Work` in the model's backlog) from admission until it ends.
First, the work ahead of it: the backlog's estimate (`backlog.Backlog.ahead_s`: the running
generations' and builds' tokens left, at the model's measured speed) plus the estimate of the
generations already waiting. When that exceeds `wait_s` the generation is refused at once
("busy"), with the seconds until it would fit as its retry-after: a request the model cannot
serve in time is not queued to wait for nothing. Then the bounds on memory: it is admitted when
fewer than `max_active` run and its full-precision cache (`kv_bytes`: what the dequantized
activation plus prompt and answer will take) fits in what the running ones leave of
`max_kv_bytes`. Otherwise it waits, in arrival order, at most `wait_s` seconds and only if fewer
than `max_waiting` already wait; past that the answer is a refusal (429 in the API). Waiting
checks `cancel` every 100 ms, so a request whose client left stops waiting too.

Capacity is a normal outcome here: `acquire` returns a `Slot` or a `Refusal`, never raises.
"""

from __future__ import annotations

import math
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from memcube.errors import TooManyRequests
from memos.services.activations.backlog import Backlog, Estimate, Work

Reason = Literal["busy", "queue_full", "timed_out", "cancelled"]


@dataclass(frozen=True)
class AdmissionLimits:
    max_active: int
    max_waiting: int
    wait_s: float
    max_kv_bytes: int


@dataclass(frozen=True)
class Refusal:
    reason: Reason
    retry_after_s: float = field(default=0.0, compare=False)  # when to try again


@dataclass(frozen=True)
class AdmissionStats:
    active: int
    waiting: int
    kv_bytes: int  # reserved by the running generations
    refused: dict[str, int]  # reason -> count since start


class Slot:
    """A running generation's place and its work in the backlog (`work.advance` as it runs);
    `release()` gives both back (once, whatever calls it)."""

    def __init__(self, gate: GenerationGate, kv_bytes: int, work: Work) -> None:
        self._gate, self.kv_bytes, self.work = gate, kv_bytes, work
        self._released = False

    def release(self) -> None:
        self._gate._release(self)


@dataclass(eq=False)
class _Waiting:
    seconds: float  # its own estimated work


class GenerationGate:
    def __init__(self, limits: AdmissionLimits, backlog: Backlog) -> None:
        self.limits, self.backlog = limits, backlog
        self._lock = threading.Condition()
        self._active = 0
        self._kv_bytes = 0
        self._waiting: deque[_Waiting] = deque()
        self._refused: Counter[str] = Counter()

    def _fits(self, kv_bytes: int) -> bool:
        limits = self.limits
        return self._active < limits.max_active and (
            self._kv_bytes + kv_bytes <= limits.max_kv_bytes
        )

    def _admit(self, kv_bytes: int, prefill: int, decode: int) -> Slot:
        self._active += 1
        self._kv_bytes += kv_bytes
        return Slot(self, kv_bytes, self.backlog.add(prefill, decode))

    def ahead_s(self, estimate: Estimate) -> float:
        """Estimated model seconds ahead of a generation that asked now."""
        with self._lock:
            return self._ahead_s(estimate)

    def _ahead_s(self, estimate: Estimate) -> float:
        return self.backlog.ahead_s(estimate) + sum(w.seconds for w in self._waiting)

    def acquire(
        self,
        kv_bytes: int,
        cancel: Callable[[], bool] = lambda: False,
        *,
        prefill: int = 0,
        decode: int = 0,
        estimate: Estimate = lambda prefill, decode: 0.0,
    ) -> Slot | Refusal:
        """A slot for a generation whose cache will take `kv_bytes` (<= max_kv_bytes) and that
        will prefill `prefill` and decode `decode` tokens; `estimate` turns tokens into
        seconds (the runtime's measured speed)."""
        assert kv_bytes <= self.limits.max_kv_bytes, "the caller refuses what can never fit"
        limits = self.limits
        with self._lock:
            ahead = self._ahead_s(estimate)
            if ahead > limits.wait_s:
                return self._refuse("busy", ahead - limits.wait_s)
            if not self._waiting and self._fits(kv_bytes):
                return self._admit(kv_bytes, prefill, decode)
            if len(self._waiting) >= limits.max_waiting:
                return self._refuse("queue_full", limits.wait_s)
            me = _Waiting(estimate(prefill, decode))
            self._waiting.append(me)
            deadline = time.monotonic() + limits.wait_s
            try:
                while True:
                    if self._waiting[0] is me and self._fits(kv_bytes):
                        return self._admit(kv_bytes, prefill, decode)
                    if cancel():
                        return self._refuse("cancelled")
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return self._refuse("timed_out", limits.wait_s)
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
            slot.work.done()
            self._lock.notify_all()

    def _refuse(self, reason: Reason, retry_after_s: float = 0.0) -> Refusal:
        self._refused[reason] += 1
        return Refusal(reason, retry_after_s)

    def stats(self) -> AdmissionStats:
        with self._lock:
            return AdmissionStats(
                self._active, len(self._waiting), self._kv_bytes, dict(self._refused)
            )


def refused(limits: AdmissionLimits, refusal: Refusal) -> TooManyRequests:
    """The 429 a refused generation (or chat turn) answers with."""
    retry_after = max(1, math.ceil(refusal.retry_after_s))
    if refusal.reason == "busy":
        message = (
            f"the model has about {limits.wait_s + refusal.retry_after_s:.0f} s of work "
            f"ahead of this generation and generations wait at most {limits.wait_s:g} s"
        )
    else:
        message = (
            f"{limits.max_active} generations are running and {limits.max_waiting} may "
            f"wait ({refusal.reason.replace('_', ' ')})"
        )
    return TooManyRequests(
        f"{message}; try again in {retry_after} s",
        code="too_many_generations",
        retry_after=retry_after,
    )
