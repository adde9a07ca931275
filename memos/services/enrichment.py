"""Enrichment and linking of notes, off the request path (A-MEM, arXiv 2502.12110).

An add commits raw notes with `enrichment = "pending"` and returns. A worker thread then takes
pending notes in `seq` order, a batch at a time: the enricher plug-in gives each its keywords,
tags and context, its vector is re-embedded from all of them (`memcube.notes.embedding_text`), and
it is linked, in both directions, to
- `follows`: the previous and the next note of the same session,
- `similar`: dense neighbours above a cosine threshold,
- `same_entity`: dense neighbours that share a keyword with it,
- `duplicate`: an enriched neighbour it repeats (same speaker and session, near-same text),
- `updates`: an enriched neighbour whose fact it revises; that neighbour evolves at once (new
  tags and context, re-embedded, version + 1, the old version in history with the reason).
The rules for the last two are in memcube/linking.py. A note's links are rebuilt from scratch
each time it is enriched, so a crash mid-batch (the batch stays pending) or a re-enrichment
after an edit never duplicates a link; an evolution applies only to the version it was planned
for.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections import defaultdict
from collections.abc import Sequence

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from memcube.enrichment import Enricher, Enrichment, NoteInput
from memcube.errors import NotFound
from memcube.notes import to_doc
from memcube.types import ScoredSeq
from memos.db.engine import Database
from memos.db.models import Memory, MemoryHistory
from memos.db.types import utcnow
from memos.services.indexes import IndexRegistry
from memos.services.linking import (
    PlannedEvolution,
    PlannedLink,
    apply_evolution,
    judge,
    keywords_of,
    plan_links,
    replace_links,
)
from memos.services.repository import bump_generation, enriched_text
from memos.settings import EnrichmentConfig

log = logging.getLogger("memos.enrichment")


class EnrichmentService:
    def __init__(
        self,
        db: Database,
        indexes: IndexRegistry,
        enricher: Enricher,
        config: EnrichmentConfig,
    ) -> None:
        self.db = db
        self.indexes = indexes
        self.enricher = enricher
        self.config = config

    def run_once(self) -> int:
        """Enrich up to one batch of pending notes; returns how many were taken."""
        with self.db.read() as s:
            taken = s.execute(
                select(Memory.seq, Memory.cube_id)
                .where(Memory.enrichment == "pending", Memory.deleted_at.is_(None))
                .order_by(Memory.seq)
                .limit(self.config.batch_size)
            ).all()
        by_cube: dict[str, list[int]] = defaultdict(list)
        for seq, cube_id in taken:
            by_cube[cube_id].append(seq)
        for cube_id, seqs in by_cube.items():
            try:
                self._enrich(cube_id, seqs)
            except NotFound:
                continue  # the cube was deleted meanwhile
            except Exception:
                # One bad batch must not stop enrichment for every cube: park it as failed.
                log.exception("enrichment failed", extra={"fields": {"cube_id": cube_id}})
                self._mark_failed(seqs)
        return len(taken)

    def _enrich(self, cube_id: str, seqs: list[int]) -> None:
        index = self.indexes.get(cube_id)
        with self.db.read() as s:
            rows = s.scalars(
                select(Memory).where(Memory.seq.in_(seqs), Memory.deleted_at.is_(None))
            ).all()
        if not rows:
            return
        # A raising enricher is handled by `run_once`: the batch is parked as failed.
        results = self.enricher.enrich(
            [NoteInput(r.content, r.speaker, r.session_id, r.timestamp) for r in rows]
        )
        assert len(results) == len(rows), "an enricher returns one result per note"
        with self.db.read() as s:
            texts = [
                enriched_text(s, r, e.keywords, e.tags, e.context)
                for r, e in zip(rows, results, strict=True)
            ]
        # The enriched vectors (see `embedding_text`), embedded outside any transaction.
        vectors = self.indexes.embed(texts)
        # Neighbours are found with the enriched vector, so like is compared with like: the
        # index holds enriched vectors for every enriched note.
        neighbours = {
            r.seq: index.search(vector, "", self.config.neighbours + 1, mode="dense")
            for r, vector in zip(rows, vectors, strict=True)
        }
        with self.db.read() as s:
            judged, evolutions = judge(s, rows, results, neighbours, self.config.linking)
        if evolutions:
            evolved = self.indexes.embed([evolution.text for evolution in evolutions.values()])
            for evolution, vector in zip(evolutions.values(), evolved, strict=True):
                evolution.vector = vector
        with self.indexes.writing(cube_id) as index:
            committed = self._commit(
                cube_id, rows, results, vectors, neighbours, judged, evolutions
            )
            if committed is not None:
                generation, changed = committed
                index.apply([to_doc(row) for row in changed], [], generation)

    def _commit(
        self,
        cube_id: str,
        rows: Sequence[Memory],
        results: list[Enrichment],
        vectors: np.ndarray,
        neighbours: dict[int, list[ScoredSeq]],
        judged: list[PlannedLink],
        evolutions: dict[int, PlannedEvolution],
    ) -> tuple[int, list[Memory]] | None:
        """One transaction: enrichments, vectors, history, links, evolutions. Returns the new
        generation and the rows it changed."""
        # By id too: SQLite reuses the seq of an erased last row for the next memory added.
        versions = {r.seq: (r.id, r.version) for r in rows}
        with self.db.write() as s:
            fresh = [
                row
                for row in s.scalars(select(Memory).where(Memory.seq.in_(list(versions)))).all()
                # An edit, delete or erasure that landed meanwhile makes this enrichment stale.
                if row.deleted_at is None and (row.id, row.version) == versions[row.seq]
            ]
            if not fresh:
                return None
            generation = bump_generation(s, cube_id)
            by_seq = dict(
                zip((r.seq for r in rows), zip(results, vectors, strict=True), strict=True)
            )
            keywords = keywords_of(s, [n.seq for hits in neighbours.values() for n in hits])
            for row in fresh:
                enrichment, vector = by_seq[row.seq]
                self._apply(s, row, enrichment, generation)
                row.embedding = vector.astype(np.float32).tobytes()
                keywords[row.seq] = set(row.keywords)
            kept = {row.seq for row in fresh}
            links = [
                link
                for row in fresh
                for link in plan_links(
                    s, row, neighbours[row.seq], keywords, self.config.similar_threshold
                )
            ] + [link for link in judged if link.src in kept]
            replace_links(s, cube_id, sorted(kept), links)
            evolved = [
                note
                for planned in evolutions.values()
                if any(link.dst == planned.seq and link.kind == "updates" for link in links)
                and (note := apply_evolution(s, planned, generation)) is not None
            ]
            s.flush()
            return generation, fresh + evolved

    def _mark_failed(self, seqs: list[int]) -> None:
        with self.db.write() as s:
            for row in s.scalars(select(Memory).where(Memory.seq.in_(seqs))):
                row.enrichment = "failed"

    @staticmethod
    def _apply(s: Session, row: Memory, enrichment: Enrichment, generation: int) -> None:
        row.keywords = [*enrichment.keywords, *(d.isoformat() for d in enrichment.dates)]
        row.tags = list(enrichment.tags)
        row.context = enrichment.context
        row.enrichment = "done"
        row.enriched_at = utcnow()
        row.change_seq = generation
        # Enrichment completes the current version rather than making a new one.
        history = s.scalar(
            select(MemoryHistory).where(
                MemoryHistory.memory_seq == row.seq, MemoryHistory.version == row.version
            )
        )
        if history is not None:
            history.keywords, history.tags, history.context = row.keywords, row.tags, row.context


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
