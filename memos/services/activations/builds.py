"""Activation builds: a bounded queue, progress, cancellation.

Every build, inline or in the background, holds a place from admission to its end: at most
`max_builds` daemon-wide and `max_per_user` per cube owner, so one tenant cannot fill the
queue for everyone; past either `admit` returns None (the service answers 429). Background
builds run on `workers` threads in arrival order, their forward passes as background work (the
model lock serves interactive requests first, see `kv_runtime.turns`). While a build runs, its
tokens are work in the model's backlog (`backlog`), so admission sees what it has left.

Cancellation: deleting an activation (or its cube, or stopping the daemon) sets its ticket's
event. A queued build is dropped at once; a running one stops at its next prefill chunk, from
the progress callback (the runtime's hook for aborting a prefill), and removes whatever files
it wrote. A build that finishes after its row was deleted removes its files too, so a deleted
activation never leaves any behind.

An episodic build (`job.episodic`) runs the same way: `episodes.build` prefills each episode in
turn, with the same progress callback and so the same cancellation.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field

from kv_runtime import CompressionConfig
from memcube.embedder import Embedder
from memcube.errors import Unavailable
from memos.services.activations import episodes
from memos.services.activations.backlog import Backlog
from memos.services.activations.catalogue import CUBE_DELETED, INTERRUPTED, Catalogue
from memos.services.activations.episodes import EpisodicPlan
from memos.services.runtime import RuntimeHolder

log = logging.getLogger("memos.activations")


class BuildCancelled(Exception):
    """Raised from the progress callback to abort a cancelled build's prefill."""


@dataclass(frozen=True)
class BuildJob:
    """What to build: the context's tokens, the messages they render, how to compress."""

    activation_id: str
    cube_id: str
    owner_id: str
    token_ids: tuple[int, ...]
    messages: tuple[Mapping[str, str], ...]
    settings: CompressionConfig
    episodic: EpisodicPlan | None = None  # an episodic activation's windows and budget


@dataclass(eq=False)
class BuildTicket:
    """A build's place in the queue and its cancel switch."""

    job: BuildJob
    cancelled: threading.Event = field(default_factory=threading.Event)
    reason: str = ""
    background: bool = False  # on a worker thread: nobody waits for it

    def cancel(self, reason: str) -> None:
        self.reason = self.reason or reason
        self.cancelled.set()


@dataclass(frozen=True)
class BuildStats:
    queued: int
    running: int
    finished: Mapping[str, int]  # "ready" / "failed" / "cancelled" -> builds since start


class BuildQueue:
    """Admission, FIFO queue and worker threads; `run(ticket)` does the build itself."""

    def __init__(
        self,
        run: Callable[[BuildTicket], str],
        *,
        workers: int,
        max_builds: int,
        max_per_user: int,
    ) -> None:
        self._run, self._workers = run, workers
        self.max_builds, self.max_per_user = max_builds, max_per_user
        self._lock = threading.Condition()
        self._queue: deque[BuildTicket] = deque()
        self._tickets: dict[str, BuildTicket] = {}  # admitted, not finished: activation id ->
        self._per_user: Counter[str] = Counter()
        self._running = 0
        self._finished: Counter[str] = Counter()
        self._threads: list[threading.Thread] = []
        self._stopping = False

    def admit(self, job: BuildJob) -> BuildTicket | None:
        """A place for `job`, or None when the daemon or its owner has too many builds."""
        with self._lock:
            full = len(self._tickets) >= self.max_builds
            if full or self._per_user[job.owner_id] >= self.max_per_user or self._stopping:
                return None
            ticket = BuildTicket(job)
            self._tickets[job.activation_id] = ticket
            self._per_user[job.owner_id] += 1
            return ticket

    def run_inline(self, ticket: BuildTicket) -> None:
        """Build in the caller's thread, keeping its place until done."""
        with self._lock:
            self._running += 1
        try:
            self._finish(ticket, self._run(ticket))
        except BaseException:
            self._finish(ticket, "failed")
            raise

    def abandon(self, ticket: BuildTicket) -> None:
        """Give back the place of a build that will not run after all."""
        with self._lock:
            self._release(ticket, None)

    def enqueue(self, ticket: BuildTicket) -> None:
        """Build on a worker thread, after the builds queued before it."""
        with self._lock:
            ticket.background = True
            self._queue.append(ticket)
            if not self._threads:
                for i in range(self._workers):
                    thread = threading.Thread(
                        target=self._work, name=f"memos-builds-{i}", daemon=True
                    )
                    thread.start()
                    self._threads.append(thread)
            self._lock.notify()

    def _work(self) -> None:
        while True:
            with self._lock:
                while not self._queue and not self._stopping:
                    self._lock.wait()
                if self._stopping:
                    return
                ticket = self._queue.popleft()
                self._running += 1
            try:
                outcome = self._run(ticket)
            except Exception:  # recorded on the row by the builder
                outcome = "failed"
                log.exception("activation build failed", extra={"fields": {"id": _id(ticket)}})
            self._finish(ticket, outcome)

    def _finish(self, ticket: BuildTicket, outcome: str) -> None:
        with self._lock:
            self._running -= 1
            self._release(ticket, outcome)

    def _release(self, ticket: BuildTicket, outcome: str | None) -> None:
        """Give a ticket's place back (the lock is held)."""
        if self._tickets.get(_id(ticket)) is ticket:
            del self._tickets[_id(ticket)]
            self._per_user[ticket.job.owner_id] -= 1
            if not self._per_user[ticket.job.owner_id]:
                del self._per_user[ticket.job.owner_id]
            if outcome is not None:
                self._finished[outcome] += 1
            self._lock.notify_all()

    # -- cancellation -----------------------------------------------------------------------

    def cancel(self, activation_id: str, reason: str) -> bool:
        """Cancel one build; a queued one gives its place back at once."""
        return bool(self._cancel_where(lambda t: _id(t) == activation_id, reason))

    def cancel_cube(self, cube_id: str, reason: str) -> int:
        return self._cancel_where(lambda t: t.job.cube_id == cube_id, reason)

    def _cancel_where(self, match: Callable[[BuildTicket], bool], reason: str) -> int:
        with self._lock:
            hits = [t for t in self._tickets.values() if match(t)]
            for ticket in hits:
                ticket.cancel(reason)
                if ticket in self._queue:
                    self._queue.remove(ticket)
                    self._release(ticket, "cancelled")
        return len(hits)

    def building(self) -> set[str]:
        """Ids of the builds admitted and not finished (their rows say "building")."""
        with self._lock:
            return set(self._tickets)

    def stats(self) -> BuildStats:
        with self._lock:
            return BuildStats(len(self._queue), self._running, dict(self._finished))

    def join(self, timeout: float) -> bool:
        """Wait until no build is queued or running; whether that happened in time."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while self._tickets:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._lock.wait(left)
        return True

    def stop(self, timeout: float = 30) -> None:
        """Cancel every build (their rows are failed as interrupted) and stop the workers."""
        self._cancel_where(lambda t: True, INTERRUPTED)
        with self._lock:
            self._stopping = True
            self._lock.notify_all()
            threads, self._threads = self._threads, []
        for thread in threads:
            thread.join(timeout)


def _id(ticket: BuildTicket) -> str:
    return ticket.job.activation_id


class Builder:
    """One build: prefill (reporting progress, checking for cancellation), compress, store."""

    def __init__(
        self,
        catalogue: Catalogue,
        runtime: RuntimeHolder,
        backlog: Backlog,
        embedder: Embedder | None = None,
    ) -> None:
        self.catalogue = catalogue
        self.runtime = runtime
        self.backlog = backlog
        self.embedder = embedder  # episodic builds cluster with it

    def __call__(self, ticket: BuildTicket) -> str:
        """Build; the outcome ("ready", "failed", "cancelled"). Failures are also raised."""
        job, catalogue = ticket.job, self.catalogue
        last_report = [0.0]
        work = self.backlog.add(len(job.token_ids), background=ticket.background)

        def on_progress(done: int, total: int) -> None:
            work.advance(done)
            if ticket.cancelled.is_set():
                raise BuildCancelled(ticket.reason)
            now = time.monotonic()
            if now - last_report[0] >= 0.5:  # at most two progress writes a second
                last_report[0] = now
                # 1.0 only once stored: compression and the write come after the prefill.
                catalogue.set_progress(job.activation_id, min(round(done / total, 4), 0.99))

        try:
            if ticket.cancelled.is_set():
                raise BuildCancelled(ticket.reason)
            runtime = self.runtime.get()
            turn: AbstractContextManager[None] = (
                runtime.background() if ticket.background else nullcontext()
            )
            path = catalogue.path(job.cube_id, job.activation_id)
            compression = None
            if job.episodic is not None:
                if self.embedder is None:
                    raise Unavailable("episodic activations need the daemon's embedder")
                with turn:  # E budgeted prefills of the whole conversation, each episode saved
                    manifest, built = episodes.build(
                        runtime, self.embedder, job.episodic, job.token_ids, job.messages,
                        job.settings, path, on_progress,
                    )  # fmt: skip
                compression = {
                    **job.settings.model_dump(),
                    "episodic": {
                        **job.episodic.settings.as_dict(),
                        "scorer": episodes.EPISODE_SCORER,
                        "built": [e.as_dict() for e in built],
                    },
                }
            else:
                with turn:
                    compressed = runtime.capture(job.token_ids, job.settings, on_progress)
                work.done()  # the rest (writing) does not need the model
                on_progress(len(job.token_ids), len(job.token_ids))  # last look before writing
                manifest = runtime.save_activation(path, compressed, job.messages)
        except BuildCancelled:
            self._discard(ticket)
            return "cancelled"
        except Exception as exc:
            catalogue.remove_files(job.cube_id, job.activation_id)
            catalogue.mark_failed(job.activation_id, f"{type(exc).__name__}: {exc}")
            raise
        finally:
            work.done()  # (once: it left the backlog when the model's part was over)
        if ticket.cancelled.is_set() or not catalogue.mark_ready(
            job.activation_id, manifest.kept_tokens, manifest.bytes, compression
        ):  # deleted while it was written: its files must not outlive it
            self._discard(ticket)
            return "cancelled"
        return "ready"

    def _discard(self, ticket: BuildTicket) -> None:
        """A cancelled build's files go; its row (if still there) says why it failed."""
        job = ticket.job
        self.catalogue.remove_files(
            job.cube_id, job.activation_id, prune_cube=ticket.reason == CUBE_DELETED
        )
        self.catalogue.mark_failed(job.activation_id, ticket.reason)
