"""Foreground work in flight, so that background work can step aside for it.

A search marks itself `active()` while it runs: a client is waiting on it. Background work
(enrichment) calls `pause()` between its steps (each embedding chunk, each batch's commit):
while any search is in flight it waits, at most `max_wait_s` a step, so under a steady stream
of searches it still moves on, a step at a time. Python runs one thread at a time, and a
background step that holds the interpreter (building a batch's rows and links, say) stretches
every search that runs beside it; waiting for a gap between searches avoids that.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass


@dataclass(frozen=True)
class ForegroundStats:
    """Since start: searches marked active, background pauses that waited, seconds waited."""

    active_total: int
    pauses_waited: int
    waited_s: float


class Foreground:
    def __init__(self, max_wait_s: float) -> None:
        assert max_wait_s >= 0, "max_wait_s is a duration"
        self.max_wait_s = max_wait_s
        self._cond = threading.Condition(threading.Lock())
        self._active = 0
        self._active_total = 0
        self._pauses_waited = 0
        self._waited_s = 0.0

    @contextmanager
    def active(self) -> Iterator[None]:
        """Mark foreground work in flight for the duration of the block."""
        with self._cond:
            self._active += 1
            self._active_total += 1
        try:
            yield
        finally:
            with self._cond:
                self._active -= 1
                if not self._active:
                    self._cond.notify_all()

    @property
    def in_flight(self) -> int:
        return self._active

    def pause(self) -> float:
        """Wait while foreground work is in flight, at most `max_wait_s`; returns the seconds
        waited (0.0 at once when none is)."""
        if not self._active or not self.max_wait_s:
            return 0.0
        started = time.monotonic()
        deadline = started + self.max_wait_s
        with self._cond:
            while self._active and (left := deadline - time.monotonic()) > 0:
                self._cond.wait(left)
            waited = time.monotonic() - started
            self._pauses_waited += 1
            self._waited_s += waited
        return waited

    def stats(self) -> ForegroundStats:
        with self._cond:
            return ForegroundStats(self._active_total, self._pauses_waited, self._waited_s)
