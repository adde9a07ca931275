"""The model's backlog: work admitted and not done yet, in tokens, and how long it will take.

Every generation (from admission to its end) and every build (while it runs) holds a `Work`:
the tokens it has to prefill and to decode, and how many it has done. `ahead_s(estimate)` is
the model time that stands between a new interactive request and the model: what the
interactive work still has to do, plus at most one prefill chunk of each background build (the
model lock runs interactive passes first; a background build gets a chunk in between only every
so often, see `kv_runtime.turns`). `estimate(prefill, decode)` turns tokens into seconds with
the runtime's measured speed (`kv_runtime.Throughput.seconds`).

Admission compares that with a wait budget: the generation gate refuses a generation at once
when the work ahead of it would take longer than it may wait, and a build runs inside its request
only when the work ahead and its own fit the budget (otherwise it builds in the background).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

Estimate = Callable[[int, int], float]  # (prefill tokens, decode tokens) -> seconds


@dataclass(eq=False)
class Work:
    """One request's model work: tokens to prefill and to decode, and how many are done."""

    prefill: int
    decode: int
    background: bool = False
    prefilled: int = 0
    decoded: int = 0
    _backlog: Backlog | None = field(default=None, repr=False)

    def advance(self, prefilled: int, decoded: int = 0) -> None:
        """Progress so far (totals, not increments)."""
        self.prefilled, self.decoded = prefilled, decoded

    def left(self) -> tuple[int, int]:
        """(prefill, decode) tokens still to run."""
        return max(0, self.prefill - self.prefilled), max(0, self.decode - self.decoded)

    def done(self) -> None:
        """It ended (or never ran): it leaves the backlog; once, whatever calls it."""
        if self._backlog is not None:
            self._backlog._remove(self)


class Backlog:
    """Thread-safe set of the `Work` admitted and not done."""

    def __init__(self, chunk_tokens: int) -> None:
        """`chunk_tokens`: the runtime's prefill chunk (a background build's pass)."""
        self.chunk_tokens = chunk_tokens
        self._lock = threading.Lock()
        self._work: set[Work] = set()

    def add(self, prefill: int, decode: int = 0, *, background: bool = False) -> Work:
        work = Work(prefill, decode, background, _backlog=self)
        with self._lock:
            self._work.add(work)
        return work

    def _remove(self, work: Work) -> None:
        with self._lock:
            self._work.discard(work)

    def ahead_s(self, estimate: Estimate) -> float:
        """Estimated model seconds ahead of a new interactive request."""
        with self._lock:
            work = list(self._work)
        seconds = 0.0
        for item in work:
            prefill, decode = item.left()
            if item.background:  # one chunk at most: the pass that may be running
                prefill, decode = min(prefill, self.chunk_tokens), 0
            seconds += estimate(prefill, decode)
        return seconds

    def work(self) -> list[Work]:
        """What is in it now."""
        with self._lock:
            return list(self._work)

    def __len__(self) -> int:
        with self._lock:
            return len(self._work)
