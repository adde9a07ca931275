"""Enrichment and linking of notes, off the request path (A-MEM, arXiv 2502.12110).

An add commits raw notes with `enrichment = "pending"` and returns. A worker thread then takes
pending notes in `seq` order, a batch at a time: the enricher plug-in gives each its keywords,
tags and context, its vector is re-embedded from all of them (`memcube.notes.embedding_text`), and
it is linked, in both directions, to
- `follows`: the previous and the next note of the same session,
- `similar`: dense neighbours above a cosine threshold,
- `same_entity`: dense neighbours that share a keyphrase with it (resolved dates are kept in
  `dates`, not among the keywords: sharing a day makes no entity),
- `duplicate`: an enriched neighbour it repeats (same speaker and session, near-same text),
- `updates`: an enriched neighbour whose fact it revises; that neighbour evolves at once (new
  tags and context, re-embedded, version + 1, the old version in history with the reason).
The rules for the last two are in memcube/linking.py. A note's links are rebuilt from scratch
each time it is enriched, so a crash mid-batch (the batch stays pending) or a re-enrichment
after an edit never duplicates a link; an evolution applies only to the version it was planned
for.

Enrichment steps aside for searches: before each embedding chunk and each batch's commit it
calls `pause` (memos/services/foreground.py), which waits while a search is in flight, and its
embeddings run on the embedder's background lane. Batches are small (`batch_size`, 16 notes by
default) since a batch's commit cannot pause midway.

Failures stay with the notes they hit. The `llm` enricher hands any note it fails to `local`
itself; a batch the enricher raises on is enriched again note by note; a note that still fails
(or whose batch fails past the enricher: embedding, linking, the commit) records the attempt on
its row, at the version it was read at, and is retried with backoff by the `enrichment_retry`
job (memos/services/enrichment_retries.py) until it is parked as "failed".

Several daemons on one database share the queue: each batch, pending or due for a retry, is
claimed first (memos/services/enrichment_claims.py), so each note is enriched by one daemon;
the commit and the failure record apply only to notes this daemon still holds the claim on.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np
from sqlalchemy import select, tuple_
from sqlalchemy.orm import Session

from memcube.enrichment import EmbedFn, Enricher, Enrichment, NoteInput
from memcube.errors import NotFound
from memcube.notes import to_doc
from memcube.types import ScoredSeq
from memos.db.engine import Database
from memos.db.locking import lock_cube, lock_memories
from memos.db.models import Memory, MemoryHistory
from memos.db.types import utcnow
from memos.services.enrichment_claims import Claims
from memos.services.enrichment_retries import (
    RetryPolicy,
    due_query,
    error_text,
    record_failures,
)
from memos.services.indexes import IndexRegistry
from memos.services.linking import (
    PlannedEvolution,
    PlannedLink,
    apply_evolution,
    judge,
    keywords_of,
    plan_links,
    replace_links,
    session_neighbours,
)
from memos.services.repository import bump_generation, enriched_text
from memos.settings import EnrichmentConfig

log = logging.getLogger("memos.enrichment")


@dataclass(frozen=True)
class RetryReport:
    """What one retry run did: notes due, then enriched, failing again, parked, or changed
    meanwhile (edited, deleted, or their cube deleted)."""

    due: int
    done: int
    retrying: int
    failed: int
    stale: int


class EnrichmentService:
    def __init__(
        self,
        db: Database,
        indexes: IndexRegistry,
        enricher: Enricher,
        config: EnrichmentConfig,
        embed: EmbedFn | None = None,
        pause: Callable[[], object] = lambda: None,
        claims: Claims | None = None,
    ) -> None:
        """`embed`: background embedding for enriched and evolved notes (default: the index
        registry's); `pause`: called between steps, to wait while searches are in flight;
        `claims`: this daemon's hold on the notes it enriches (default: a lone daemon's)."""
        self.db = db
        self.indexes = indexes
        self.enricher = enricher
        self.config = config
        self.embed = embed or indexes.embed
        self.pause = pause
        self.policy = RetryPolicy.of(config)
        self.claims = claims or Claims(db, "local", 60.0)
        self.enriched = 0  # notes this daemon enriched since it started (for /metrics)

    def run_once(self) -> int:
        """Claim and enrich up to one batch of pending notes; returns how many were taken."""
        now = utcnow()
        taken = self.claims.take(
            select(Memory.seq, Memory.cube_id)
            .where(Memory.enrichment == "pending", Memory.deleted_at.is_(None))
            .order_by(Memory.seq)
            .limit(self.config.batch_size),
            now,
        )
        self._run_claimed(taken, "pending", now)
        return len(taken)

    def retry_due(self, now: datetime | None = None) -> RetryReport:
        """Try again the notes whose next attempt is due at `now` (default: the present),
        at most `retry_max_notes` of them, a claimed batch at a time."""
        now = now or utcnow()
        outcome: Counter[str] = Counter()
        due = 0
        while due < self.config.retry_max_notes:
            limit = min(self.config.batch_size, self.config.retry_max_notes - due)
            # Claimed at the present, due at `now`: a retry moves its notes past `now`.
            taken = self.claims.take(due_query(now, limit))
            if not taken:
                break
            due += len(taken)
            outcome += self._run_claimed(taken, "retrying", now)
        return RetryReport(
            due=due,
            done=outcome["done"],
            retrying=outcome["retrying"],
            failed=outcome["failed"],
            stale=due - outcome["done"] - outcome["retrying"] - outcome["failed"],
        )

    def _run_claimed(
        self, taken: Sequence[tuple[int, str]], state: str, now: datetime
    ) -> Counter[str]:
        """Enrich claimed notes, (seq, cube_id) rows; their claims end however it ends."""
        outcome: Counter[str] = Counter()
        try:
            for cube_id, seqs in _by_cube(taken).items():
                outcome += self._run(cube_id, seqs, state, now)
        finally:
            self.claims.release([seq for seq, _ in taken])
        return outcome

    def _run(self, cube_id: str, seqs: list[int], state: str, now: datetime) -> Counter[str]:
        """Enrich these notes of the cube that are still in `state`; a failure is recorded on
        the notes it hit, at the version they were read at. Returns notes by outcome."""
        with self.db.read() as s:
            rows = s.scalars(
                select(Memory).where(
                    Memory.cube_id == cube_id,
                    Memory.seq.in_(seqs),
                    Memory.enrichment == state,
                    Memory.deleted_at.is_(None),
                )
            ).all()
        tried = {row.seq: row.version for row in rows}
        outcome: Counter[str] = Counter()
        if not rows:
            return outcome
        self.pause()
        results, errors = self._enrich_each(rows)
        self.claims.extend(seqs)  # the enricher may have been slow (a language model)
        enriched = [row for row in rows if row.seq in results]
        try:
            if enriched:
                outcome["done"] = self._link_and_commit(cube_id, enriched, results)
                self.enriched += outcome["done"]
        except NotFound:
            return outcome  # the cube was deleted meanwhile
        except Exception as exc:
            # Past the enricher (embedding, linking, the commit), a failure hits the batch.
            log.exception("enrichment failed", extra={"fields": {"cube_id": cube_id}})
            errors.update((row.seq, error_text(exc)) for row in enriched)
        if errors:
            with self.db.write() as s:
                outcome += record_failures(
                    s, cube_id, tried, errors, self.policy, now, self.claims.holder
                )
        return outcome

    def _enrich_each(self, rows: Sequence[Memory]) -> tuple[dict[int, Enrichment], dict[int, str]]:
        """Enrichments by seq, and errors by seq for the notes the enricher failed on. A batch
        that raises is enriched again note by note, so only the notes that break it fail."""
        notes = [NoteInput(r.content, r.speaker, r.session_id, r.timestamp) for r in rows]
        try:
            results = self.enricher.enrich(notes)
        except Exception as exc:
            if len(rows) == 1:
                return {}, {rows[0].seq: error_text(exc)}
            log.warning("enrichment batch failed; enriching its notes one by one: %s", exc)
        else:
            assert len(results) == len(rows), "an enricher returns one result per note"
            return {r.seq: e for r, e in zip(rows, results, strict=True)}, {}
        enriched: dict[int, Enrichment] = {}
        errors: dict[int, str] = {}
        for row, note in zip(rows, notes, strict=True):
            try:
                (enriched[row.seq],) = self.enricher.enrich([note])
            except Exception as exc:
                log.warning("enrichment of one note failed: %s", exc)
                errors[row.seq] = error_text(exc)
        return enriched, errors

    def _link_and_commit(
        self, cube_id: str, rows: Sequence[Memory], enrichments: dict[int, Enrichment]
    ) -> int:
        """Re-embed, link and commit enriched notes; returns how many were committed (notes
        edited or deleted meanwhile are not)."""
        index = self.indexes.get(cube_id)
        results = [enrichments[r.seq] for r in rows]
        with self.db.read() as s:
            texts = [
                enriched_text(s, r, e.keywords, e.tags, e.context)
                for r, e in zip(rows, results, strict=True)
            ]
        # The enriched vectors (see `embedding_text`), embedded outside any transaction.
        vectors = self.embed(texts)
        # Neighbours are found with the enriched vector, so like is compared with like: the
        # index holds enriched vectors for every enriched note.
        neighbours = {
            r.seq: index.search(vector, "", self.config.neighbours + 1, mode="dense")
            for r, vector in zip(rows, vectors, strict=True)
        }
        with self.db.read() as s:
            judged, evolutions = judge(s, cube_id, rows, results, neighbours, self.config.linking)
        if evolutions:
            evolved = self.embed([evolution.text for evolution in evolutions.values()])
            for evolution, vector in zip(evolutions.values(), evolved, strict=True):
                evolution.vector = vector
        self.pause()  # the commit holds the interpreter for a while and cannot pause midway
        with self.indexes.writing(cube_id) as index:
            committed = self._commit(
                cube_id, rows, results, vectors, neighbours, judged, evolutions
            )
            if committed is None:
                return 0
            generation, fresh, changed = committed
            index.apply([to_doc(row) for row in changed], [], generation)
            return fresh

    def _commit(
        self,
        cube_id: str,
        rows: Sequence[Memory],
        results: list[Enrichment],
        vectors: np.ndarray,
        neighbours: dict[int, list[ScoredSeq]],
        judged: list[PlannedLink],
        evolutions: dict[int, PlannedEvolution],
    ) -> tuple[int, int, list[Memory]] | None:
        """One transaction: enrichments, vectors, history, links, evolutions. Returns the new
        generation, how many of `rows` it enriched and the rows it changed."""
        # By id too: SQLite reuses the seq of an erased last row for the next memory added.
        versions = {r.seq: (r.id, r.version) for r in rows}
        with self.db.write() as s:
            # PostgreSQL: the cube's row first, so commits of one cube (on any daemon) take
            # their locks in one order; then the notes, whose claims cannot change hands
            # until this commits. NO KEY: links referencing them (foreign keys) still land.
            lock_cube(s, cube_id)
            # Every note this commit may change, the evolved neighbours too, in seq order: a
            # neighbour may be another daemon's claim, released meanwhile (memos/db/locking.py).
            lock_memories(
                s, Memory.cube_id == cube_id, Memory.seq.in_(sorted({*versions, *evolutions}))
            )
            fresh = [
                row
                for row in s.scalars(
                    select(Memory)
                    .where(Memory.cube_id == cube_id, Memory.seq.in_(list(versions)))
                    .with_for_update(key_share=True)
                ).all()
                # An edit, delete or erasure that landed meanwhile makes this enrichment stale;
                # so does a claim lost to another daemon (this one outlived its lease).
                if row.deleted_at is None
                and (row.id, row.version) == versions[row.seq]
                and row.claimed_by == self.claims.holder
            ]
            if not fresh:
                return None
            generation = bump_generation(s, cube_id)
            by_seq = dict(
                zip((r.seq for r in rows), zip(results, vectors, strict=True), strict=True)
            )
            keywords = keywords_of(
                s, cube_id, [n.seq for hits in neighbours.values() for n in hits]
            )
            # Looked up for the whole batch at once: a query per note made the commit, which
            # holds the interpreter and the database's write lock, about twice as long.
            histories = _current_histories(s, cube_id, fresh)
            follows = session_neighbours(s, cube_id, fresh)
            for row in fresh:
                enrichment, vector = by_seq[row.seq]
                self._apply(row, enrichment, generation, histories.get(row.seq))
                row.embedding = vector.astype(np.float32).tobytes()
                keywords[row.seq] = set(row.keywords)
            kept = {row.seq for row in fresh}
            links = [
                link
                for row in fresh
                for link in plan_links(
                    row,
                    neighbours[row.seq],
                    keywords,
                    self.config.similar_threshold,
                    follows.get(row.seq, ()),
                )
            ] + [link for link in judged if link.src in kept]
            replace_links(s, cube_id, sorted(kept), links)
            evolved = [
                note
                for planned in evolutions.values()
                if any(link.dst == planned.seq and link.kind == "updates" for link in links)
                and (note := apply_evolution(s, cube_id, planned, generation)) is not None
            ]
            s.flush()
            return generation, len(fresh), fresh + evolved

    @staticmethod
    def _apply(
        row: Memory, enrichment: Enrichment, generation: int, history: MemoryHistory | None
    ) -> None:
        """Write the enrichment on the row and on `history`, its current version's entry:
        enrichment completes the current version rather than making a new one."""
        row.keywords = list(enrichment.keywords)
        row.dates = [d.isoformat() for d in enrichment.dates]
        row.tags = list(enrichment.tags)
        row.context = enrichment.context
        row.enrichment = "done"
        row.enriched_at = utcnow()
        row.enrichment_next_at = row.enrichment_error = None  # attempts stay on record
        row.change_seq = generation
        if history is not None:
            history.keywords, history.dates = row.keywords, row.dates
            history.tags, history.context = row.tags, row.context


def _current_histories(
    s: Session, cube_id: str, rows: Sequence[Memory]
) -> dict[int, MemoryHistory]:
    """The history entry of each row's current version, by seq (in one query)."""
    if not rows:
        return {}
    query = (
        select(MemoryHistory)
        .join(Memory, Memory.seq == MemoryHistory.memory_seq)
        .where(
            Memory.cube_id == cube_id,
            tuple_(MemoryHistory.memory_seq, MemoryHistory.version).in_(
                [(row.seq, row.version) for row in rows]
            ),
        )
    )
    return {history.memory_seq: history for history in s.scalars(query)}


def _by_cube(taken: Sequence[Any]) -> dict[str, list[int]]:
    """(seq, cube_id) pairs -> seqs by cube, in the order given."""
    by_cube: dict[str, list[int]] = defaultdict(list)
    for seq, cube_id in taken:
        by_cube[cube_id].append(seq)
    return by_cube


class EnrichmentWorker:
    """The thread that drains the pending queue; `wake()` after a write skips the idle wait."""

    def __init__(self, service: EnrichmentService, idle_poll_s: float) -> None:
        self.service = service
        self.idle_poll_s = idle_poll_s
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="memos-enrich", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=60)

    def _run(self) -> None:
        with contextlib.suppress(AttributeError, OSError):  # Linux: threads have a nice value
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)  # requests first
        while not self._stop.is_set():
            try:
                taken = self.service.run_once()
            except Exception:
                log.exception("enrichment batch failed; retrying after a pause")
                taken = 0
            if taken == 0:
                self._wake.wait(self.idle_poll_s)
                self._wake.clear()
