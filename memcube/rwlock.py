"""A readers-writer lock: searches of a cube index share it, a change being applied holds it alone.

Two rules keep either side from waiting long:
- a waiting writer holds back readers that arrive after it, so a stream of searches never
  starves a change;
- a writer that works in steps calls `yield_to_readers()` between them: if readers are waiting,
  every one of them gets in before the writer goes on, so a search waits for one step of a large
  change (one note), not for the whole change.
Not reentrant: a thread holding it must not acquire it again (a reader would wait behind a
writer that waits for it).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager


class ReadWriteLock:
    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0  # holding it
        self._writer = False  # a writer holds it
        self._readers_waiting = 0
        self._writers_waiting = 0
        # Readers let in ahead of waiting writers: those waiting when a writer last released.
        # Never more than `_readers_waiting`, so a writer waiting on it never waits forever.
        self._admitted = 0

    @contextmanager
    def read(self) -> Iterator[None]:
        self.acquire_read()
        try:
            yield
        finally:
            self.release_read()

    @contextmanager
    def write(self) -> Iterator[None]:
        self.acquire_write()
        try:
            yield
        finally:
            self.release_write()

    def acquire_read(self) -> None:
        with self._cond:
            self._readers_waiting += 1
            try:
                while self._writer or (self._writers_waiting and not self._admitted):
                    self._cond.wait()
            except BaseException:
                self._readers_waiting -= 1
                self._admitted = min(self._admitted, self._readers_waiting)
                self._cond.notify_all()
                raise
            self._readers_waiting -= 1
            if self._admitted:
                self._admitted -= 1
            self._readers += 1

    def release_read(self) -> None:
        with self._cond:
            assert self._readers > 0, "release_read without acquire_read"
            self._readers -= 1
            if not self._readers:
                self._cond.notify_all()

    def acquire_write(self) -> None:
        with self._cond:
            self._writers_waiting += 1
            try:
                while self._writer or self._readers or self._admitted:
                    self._cond.wait()
            except BaseException:
                self._writers_waiting -= 1
                self._cond.notify_all()  # readers it held back may go in
                raise
            self._writers_waiting -= 1
            self._writer = True

    def release_write(self) -> None:
        with self._cond:
            assert self._writer, "release_write without acquire_write"
            self._writer = False
            self._admitted = self._readers_waiting
            self._cond.notify_all()

    def yield_to_readers(self) -> bool:
        """For the writer holding the lock, between two steps of its work: if readers are
        waiting, let them all in and wait for them to finish, then hold the lock again.
        Returns whether it yielded."""
        with self._cond:
            assert self._writer, "yield_to_readers is for the writer holding the lock"
            if not self._readers_waiting:
                return False
        self.release_write()
        self.acquire_write()
        return True

    @property
    def readers_waiting(self) -> int:
        return self._readers_waiting
