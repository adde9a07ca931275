"""Embedding lanes: threads that run forward passes, the most urgent work first.

Every forward runs on a lane's own thread: the runtimes' thread pools are per calling thread,
and forwards from many server threads would fight over the cores. Work comes in three kinds:
- `query`: a search's query, which a client is waiting on right now;
- `write`: the texts of an add or an edit, also awaited, but in bulk;
- `background`: enrichment and re-embedding, which nobody waits on.
A lane serves the most urgent kind first, FIFO within a kind. A caller hands a lane one bounded
chunk at a time and waits for it, so more urgent work waits at most for the forward in flight,
and a lane's queue never holds more than one chunk per waiting caller (callers are bounded by
the server's thread pool). A kind may have a forward of its own on a lane: background work runs
a one-thread session, so it never takes every core from the work someone waits on.
"""

from __future__ import annotations

import itertools
import queue
import threading
from collections import Counter, deque
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass
from enum import IntEnum

import numpy as np

Forward = Callable[[dict[str, np.ndarray]], np.ndarray]


class Kind(IntEnum):
    """What a forward is for; the lower the value, the sooner it is served."""

    QUERY = 0
    WRITE = 1
    BACKGROUND = 2


@dataclass(frozen=True)
class EmbedderStats:
    """Counters since the embedder started (a snapshot).

    forwards, texts: forwards served and texts embedded, by kind name;
    chars_tokenized: characters handed to the tokenizer (after cutting over-long texts);
    texts_cut: texts cut to `EmbedderConfig.max_chars` before tokenizing;
    served: (serial, lane, kind) of the most recent forwards, oldest first (at most
    `SERVED_KEPT`); the serial counts every forward served, from 0.
    """

    forwards: dict[str, int]
    texts: dict[str, int]
    chars_tokenized: int
    texts_cut: int
    served: tuple[tuple[int, str, str], ...]


SERVED_KEPT = 1024


class Recorder:
    """Thread-safe counters behind `EmbedderStats`."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._forwards: Counter[str] = Counter()
        self._texts: Counter[str] = Counter()
        self._chars = 0
        self._cut = 0
        self._served: deque[tuple[int, str, str]] = deque(maxlen=SERVED_KEPT)
        self._serial = 0

    def tokenized(self, chars: int, cut: int) -> None:
        with self._lock:
            self._chars += chars
            self._cut += cut

    def served(self, lane: str, kind: Kind, texts: int) -> None:
        with self._lock:
            name = kind.name.lower()
            self._forwards[name] += 1
            self._texts[name] += texts
            self._served.append((self._serial, lane, name))
            self._serial += 1

    def snapshot(self) -> EmbedderStats:
        with self._lock:
            return EmbedderStats(
                forwards=dict(self._forwards),
                texts=dict(self._texts),
                chars_tokenized=self._chars,
                texts_cut=self._cut,
                served=tuple(self._served),
            )


_STOP = len(Kind)  # after every kind of work


class Lane:
    """One thread running `forward` on submitted batches, most urgent kind first; a kind in
    `forwards` runs that forward instead."""

    def __init__(
        self,
        name: str,
        forward: Forward,
        recorder: Recorder,
        forwards: Mapping[Kind, Forward] | None = None,
    ) -> None:
        self.name = name
        self._forward = forward
        self._forwards = dict(forwards or {})
        self._recorder = recorder
        self._order = itertools.count()  # FIFO among equal kinds
        self._queue: queue.PriorityQueue[tuple[int, int, dict[str, np.ndarray] | None, Future]]
        self._queue = queue.PriorityQueue()
        self._guard = threading.Lock()  # orders `run`'s check-and-put against `close`
        self._closed = False
        self._thread = threading.Thread(target=self._serve, name=f"memos-embed-{name}", daemon=True)
        self._thread.start()

    def run(self, kind: Kind, batch: dict[str, np.ndarray]) -> np.ndarray:
        """batch: tokenizer arrays, each (texts, tokens) -> (texts, dim) float32. Blocks."""
        future: Future[np.ndarray] = Future()
        with self._guard:
            if self._closed:
                raise RuntimeError(f"the embedder's {self.name} lane is closed")
            self._queue.put((int(kind), next(self._order), batch, future))
        return future.result()

    def close(self) -> None:
        """Serve what is queued, then stop; later calls raise instead of waiting forever."""
        with self._guard:
            self._closed = True
            self._queue.put((_STOP, next(self._order), None, Future()))
        self._thread.join(timeout=60)

    def _serve(self) -> None:
        while True:
            kind, _, batch, future = self._queue.get()
            if batch is None:
                return
            if not future.set_running_or_notify_cancel():
                continue
            try:
                vectors = self._forwards.get(Kind(kind), self._forward)(batch)
            except BaseException as exc:  # handed to the waiting caller
                future.set_exception(exc)
            else:
                # Recorded before the caller wakes, so its next look at the stats includes it.
                self._recorder.served(self.name, Kind(kind), len(vectors))
                future.set_result(vectors)
