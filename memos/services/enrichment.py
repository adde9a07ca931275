"""Enrichment and linking of notes, off the request path (A-MEM, arXiv 2502.12110).

An add commits raw notes with `enrichment = "pending"` and returns. A worker thread then takes
pending notes in `seq` order, a batch at a time: the enricher plug-in gives each its keywords,
tags and context, and each note is linked, in both directions, to
- `follows`: the previous and the next note of the same session,
- `similar`: dense neighbours above a cosine threshold,
- `same_entity`: dense neighbours that share a keyword with it.
A note's links are rebuilt from scratch each time it is enriched, so a crash mid-batch (the
batch stays pending) or a re-enrichment after an edit never duplicates a link.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from memcube.enrichment import Enricher, Enrichment, NoteInput
from memcube.errors import NotFound
from memos.db.engine import Database
from memos.db.models import Link, Memory, MemoryHistory
from memos.db.types import utcnow
from memos.services.indexes import IndexRegistry
from memos.services.memories import bump_generation, drop_derived_links
from memos.settings import EnrichmentConfig

log = logging.getLogger("memos.enrichment")


@dataclass(frozen=True)
class PlannedLink:
    src: int
    dst: int
    kind: str
    score: float


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
        neighbours = {
            r.seq: index.search(
                np.frombuffer(r.embedding, dtype=np.float32), "", self.config.neighbours + 1,
                mode="dense",
            )
            for r in rows
        }  # fmt: skip
        with self.indexes.writing(cube_id) as index:
            committed = self._commit(cube_id, rows, results, neighbours)
            if committed is not None:
                # Neither a note's vector nor its BM25 text depends on its enrichment (yet:
                # see `lexical_text`), so the index only moves its generation forward.
                index.advance(committed)

    def _commit(
        self, cube_id: str, rows: Sequence[Memory], results: list[Enrichment], neighbours: dict
    ) -> int | None:
        """One transaction: enrichments, history, links. Returns the new generation."""
        versions = {r.seq: r.version for r in rows}
        with self.db.write() as s:
            fresh = [
                row
                for row in s.scalars(select(Memory).where(Memory.seq.in_(list(versions)))).all()
                # An edit or delete that landed meanwhile makes this enrichment stale.
                if row.deleted_at is None and row.version == versions[row.seq]
            ]
            if not fresh:
                return None
            generation = bump_generation(s, cube_id)
            by_seq = dict(zip((r.seq for r in rows), results, strict=True))
            keywords_of = self._keywords(s, [n.seq for hits in neighbours.values() for n in hits])
            for row in fresh:
                enrichment = by_seq[row.seq]
                self._apply(s, row, enrichment, generation)
                keywords_of[row.seq] = set(row.keywords)
            links = [
                link
                for row in fresh
                for link in self._plan_links(s, row, neighbours[row.seq], keywords_of)
            ]
            self._replace_links(s, cube_id, [row.seq for row in fresh], links)
            return generation

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

    @staticmethod
    def _keywords(s: Session, seqs: Sequence[int]) -> dict[int, set[str]]:
        if not seqs:
            return {}
        rows = s.execute(select(Memory.seq, Memory.keywords).where(Memory.seq.in_(set(seqs))))
        return {seq: set(keywords or []) for seq, keywords in rows}

    def _plan_links(
        self, s: Session, row: Memory, neighbours: Sequence, keywords_of: dict[int, set[str]]
    ) -> list[PlannedLink]:
        planned: list[PlannedLink] = []
        if row.session_id is not None:
            same_session = (
                Memory.cube_id == row.cube_id,
                Memory.session_id == row.session_id,
                Memory.deleted_at.is_(None),
            )
            before = s.scalar(
                select(func.max(Memory.seq)).where(*same_session, Memory.seq < row.seq)
            )
            after = s.scalar(
                select(func.min(Memory.seq)).where(*same_session, Memory.seq > row.seq)
            )
            planned += [PlannedLink(row.seq, seq, "follows", 1.0) for seq in (before, after) if seq]
        mine = set(row.keywords)
        for hit in neighbours:
            if hit.seq == row.seq:
                continue
            cosine = hit.signals["dense"]
            if cosine >= self.config.similar_threshold:
                planned.append(PlannedLink(row.seq, hit.seq, "similar", cosine))
            if mine & keywords_of.get(hit.seq, set()):
                planned.append(PlannedLink(row.seq, hit.seq, "same_entity", cosine))
        return planned

    @staticmethod
    def _replace_links(s: Session, cube_id: str, seqs: list[int], links: list[PlannedLink]) -> None:
        """Drop the notes' derived links (both directions) and write the new ones, mirrored."""
        drop_derived_links(s, seqs)
        unique: dict[tuple[int, int, str], float] = {}
        for link in links:
            for src, dst in ((link.src, link.dst), (link.dst, link.src)):
                key = (src, dst, link.kind)
                unique[key] = max(unique.get(key, link.score), link.score)
        s.add_all(
            Link(cube_id=cube_id, src_seq=src, dst_seq=dst, kind=kind, score=score)
            for (src, dst, kind), score in unique.items()
        )


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
