"""`ModelLock`: the model's lock, handed over in turn instead of grabbed.

A plain `threading.Lock` is unfair: a thread that releases it and asks again a moment later
(a decoding loop, a chunked prefill) usually gets it back before a thread that has waited all
along, so one request can starve the others for as long as it runs. This lock queues its
waiters and, on release, hands it to the next one directly; the releasing thread, asking again,
queues behind them. With N requests decoding, each waits at most one forward pass of every other.

Two classes of waiters: interactive (someone waits for the answer: a generation, a build inside
its request) and background (a build nobody waits on). Interactive waiters go first, in arrival
order. A background waiter goes first once it has waited `background_turn_s` and long enough
that background work keeps at most `background_share` of the model's time: after a background
pass of p seconds the next one waits at least p * (1 - share) / share. So background work
cannot starve (under a steady interactive load it still gets its share), and an interactive
request is delayed by at most one background pass (one prefill chunk) now and then, whatever
the chunk's length on this machine.

Which class a thread's forward passes take is set with `background()` (thread-local), so the
code between the caller and the lock (prefill, compression, query capture) needs no flag.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

POLL_S = 0.05  # how often a waiter with a cancel hook checks it
_where = threading.local()


@contextmanager
def background() -> Iterator[None]:
    """Forward passes of this thread, inside the block, wait as background work."""
    before = getattr(_where, "background", False)
    _where.background = True
    try:
        yield
    finally:
        _where.background = before


def in_background() -> bool:
    return bool(getattr(_where, "background", False))


@dataclass(eq=False)
class _Waiter:
    background: bool
    since: float
    granted: threading.Event = field(default_factory=threading.Event)


class ModelLock:
    """A FIFO lock with an interactive and a background queue; also a context manager."""

    def __init__(
        self,
        background_turn_s: float = 1.0,
        background_share: float = 0.25,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        assert 0 < background_share < 1, "a share of the model's time"
        self.background_turn_s, self.background_share = background_turn_s, background_share
        self._clock = clock
        self._mutex = threading.Lock()
        self._held = False  # invariant: a waiter is queued only while the lock is held
        self._interactive: deque[_Waiter] = deque()
        self._background: deque[_Waiter] = deque()
        self._holder_background, self._held_since = False, 0.0
        self._background_wait_s = background_turn_s  # before the next background turn

    def acquire(
        self, cancel: Callable[[], bool] | None = None, *, background: bool | None = None
    ) -> bool:
        """Wait for the lock, in turn; False (not holding it) once `cancel()` returns True.

        `background`: the waiter's class; None takes the thread's (see `background()`).
        """
        if background is None:
            background = in_background()
        with self._mutex:
            free = not self._held
            if free:
                self._held = True
                self._holding(background)
            else:
                me = _Waiter(background, self._clock())
                queue = self._background if background else self._interactive
                queue.append(me)
        if free:
            return self._keep_unless(cancel)
        if cancel is None:
            me.granted.wait()
            return True
        while not me.granted.wait(POLL_S):
            if cancel():
                with self._mutex:
                    if not me.granted.is_set():
                        queue.remove(me)
                        return False
                # Handed over meanwhile: pass it on.
                self.release()
                return False
        return self._keep_unless(cancel)

    def _keep_unless(self, cancel: Callable[[], bool] | None) -> bool:
        if cancel is not None and cancel():
            self.release()
            return False
        return True

    def release(self) -> None:
        with self._mutex:
            assert self._held, "release of a lock that is not held"
            now = self._clock()
            if self._holder_background:  # the next background turn waits in proportion
                share = self.background_share
                held = now - self._held_since
                self._background_wait_s = max(self.background_turn_s, held * (1 - share) / share)
            waiter = self._next(now)
            if waiter is None:
                self._held = False
            else:
                self._holding(waiter.background)
                waiter.granted.set()  # it holds the lock now; _held stays True

    def _holding(self, background: bool) -> None:
        """Who holds it from now (the mutex is held)."""
        self._holder_background, self._held_since = background, self._clock()

    def _next(self, now: float) -> _Waiter | None:
        """The waiter whose turn it is (the mutex is held)."""
        if self._background and (
            not self._interactive or now - self._background[0].since >= self._background_wait_s
        ):
            return self._background.popleft()
        if self._interactive:
            return self._interactive.popleft()
        return None

    def locked(self) -> bool:
        return self._held

    def waiting(self) -> tuple[int, int]:
        """(interactive, background) waiters now."""
        with self._mutex:
            return len(self._interactive), len(self._background)

    def __enter__(self) -> ModelLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
