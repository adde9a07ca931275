"""Plaintext memories: add (atomic batches), read, page, patch, soft delete, history.

Every change runs as: embed outside any transaction, then under the cube's write lock commit
one transaction that bumps the cube's generation and stamps changed rows with it, then apply
the same change to the in-memory index. A crash after the commit loses nothing: the index is
healed from the rows at the next start.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import date
from typing import Any

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from memcube.embedder import Embedder
from memcube.errors import InvalidArgument, TooLarge
from memcube.notes import embedding_text, to_doc
from memos.db.engine import Database
from memos.db.locking import lock_cube
from memos.db.models import Memory, MemoryHistory
from memos.db.types import utcnow
from memos.services.cubes import CubeService
from memos.services.ids import decode_cursor, encode_cursor, new_id
from memos.services.indexes import IndexRegistry
from memos.services.quotas import QuotaService
from memos.services.repository import (
    bump_generation,
    check_version,
    drop_derived_links,
    history_row,
    memory_not_found,
    memory_views,
)
from memos.services.views import (
    HistoryView,
    MemoryView,
    NewMemory,
    Page,
    Principal,
    Role,
)
from memos.settings import LimitsConfig

Changed = Callable[[str, list[tuple[str, int]]], object]


class MemoryService:
    def __init__(
        self,
        db: Database,
        cubes: CubeService,
        indexes: IndexRegistry,
        embedder: Embedder,
        limits: LimitsConfig,
        on_write: Callable[[], None] = lambda: None,
        quotas: QuotaService | None = None,
        on_changed: Changed = lambda cube_id, notes: None,
    ) -> None:
        self.on_write = on_write  # wakes the enrichment worker
        # After a commit that edited or deleted notes: (cube id, [(memory id, the version
        # before the change)]); drops what was derived from those versions (their KV chunks).
        self.on_changed = on_changed
        self.quotas = quotas
        self.db = db
        self.cubes = cubes
        self.indexes = indexes
        self.embedder = embedder
        self.limits = limits

    # -- writes -----------------------------------------------------------------------------

    def check_batch(self, items: Sequence[NewMemory]) -> None:
        if not items:
            raise InvalidArgument("items must hold at least one memory")
        if len(items) > self.limits.max_batch_items:
            raise TooLarge(
                f"{len(items)} items in one batch; at most {self.limits.max_batch_items} allowed"
            )
        for i, item in enumerate(items):
            self.check_content(item.content, where=f"items[{i}].content")

    def check_content(self, content: str, where: str) -> None:
        size = len(content.encode("utf-8"))
        if size > self.limits.max_content_bytes:
            raise TooLarge(
                f"{where} is {size} bytes; at most {self.limits.max_content_bytes} allowed"
            )
        if not content.strip():
            raise InvalidArgument(f"{where} is empty; a memory needs some content")

    def add(
        self, principal: Principal, cube_id: str, items: Sequence[NewMemory]
    ) -> list[MemoryView]:
        self.check_batch(items)
        self.cubes.require(principal, cube_id, Role.WRITER)
        vectors = self.embedder.embed([embedding_text(i.content) for i in items])
        now = utcnow()
        with self.indexes.writing(cube_id) as index:
            with self.db.write() as s:
                if self.quotas is not None:  # in the transaction: concurrent adds queue here
                    self.quotas.check_memories(s, cube_id, len(items))
                generation = bump_generation(s, cube_id, live_delta=len(items))
                rows = [
                    Memory(
                        id=new_id("mem"),
                        cube_id=cube_id,
                        content=item.content,
                        session_id=item.session_id,
                        speaker=item.speaker,
                        timestamp=item.timestamp,
                        metadata_=item.metadata,
                        keywords=[],
                        dates=[],
                        tags=[],
                        context="",
                        embedding=vector.astype(np.float32).tobytes(),
                        version=1,
                        change_seq=generation,
                        enrichment="pending",
                        created_at=now,
                        updated_at=now,
                    )
                    for item, vector in zip(items, vectors, strict=True)
                ]
                s.add_all(rows)
                s.flush()
                s.add_all([history_row(row, "created") for row in rows])
                s.flush()
                views = memory_views(s, rows)
            index.apply([to_doc(row) for row in rows], [], generation)
        self.on_write()
        return views

    def update(
        self,
        principal: Principal,
        cube_id: str,
        memory_id: str,
        content: str | None,
        metadata: dict[str, Any] | None,
        if_match: frozenset[int] | None = None,
    ) -> MemoryView:
        """`if_match`: the versions the caller expects (from `If-Match`); another one is 412,
        checked in the write transaction. None: no precondition."""
        if content is None and metadata is None:
            raise InvalidArgument("nothing to update: give content and/or metadata")
        if content is not None:
            self.check_content(content, where="content")
        self.cubes.require(principal, cube_id, Role.WRITER)
        vector = self.embedder.embed_one(embedding_text(content)) if content is not None else None
        with self.indexes.writing(cube_id) as index:
            with self.db.write() as s:
                row = self._live_row(s, cube_id, memory_id, for_update=True)
                check_version(row, if_match)
                generation = bump_generation(s, cube_id)
                if content is not None and vector is not None:
                    row.content = content
                    row.embedding = vector.astype(np.float32).tobytes()
                    # New content: old keywords, tags, context and links no longer apply.
                    row.keywords, row.dates, row.tags, row.context = [], [], [], ""
                    row.enrichment = "pending"
                    row.enrichment_attempts, row.enrichment_error = 0, None
                    row.enrichment_next_at = None
                    drop_derived_links(s, cube_id, [row.seq])
                if metadata is not None:
                    row.metadata_ = metadata
                row.version += 1
                row.change_seq = generation
                row.updated_at = utcnow()
                s.add(history_row(row, "updated"))
                s.flush()
                (view,) = memory_views(s, [row])
            index.apply([to_doc(row)], [], generation)
        self.on_changed(cube_id, [(memory_id, view.version - 1)])
        self.on_write()
        return view

    def delete(
        self,
        principal: Principal,
        cube_id: str,
        memory_id: str,
        if_match: frozenset[int] | None = None,
    ) -> None:
        self.cubes.require(principal, cube_id, Role.WRITER)
        with self.indexes.writing(cube_id) as index:
            with self.db.write() as s:
                row = self._live_row(s, cube_id, memory_id, for_update=True)
                check_version(row, if_match)
                generation = bump_generation(s, cube_id, live_delta=-1)
                row.version += 1
                row.change_seq = generation
                row.updated_at = row.deleted_at = utcnow()
                s.add(history_row(row, "deleted"))
            index.apply([], [row.seq], generation)
        self.on_changed(cube_id, [(memory_id, row.version - 1)])

    def delete_session(self, principal: Principal, cube_id: str, session_id: str) -> int:
        """Soft-delete every live memory of a session in one transaction; how many."""
        self.cubes.require(principal, cube_id, Role.WRITER)
        with self.indexes.writing(cube_id) as index:
            with self.db.write() as s:
                lock_cube(s, cube_id)
                rows = list(
                    s.scalars(
                        select(Memory)
                        .where(
                            Memory.cube_id == cube_id,
                            Memory.session_id == session_id,
                            Memory.deleted_at.is_(None),
                        )
                        .order_by(Memory.seq)
                        .with_for_update()
                    )
                )
                if not rows:
                    return 0
                generation = _soft_delete(s, cube_id, rows, "deleted")
            index.apply([], [row.seq for row in rows], generation)
        self.on_changed(cube_id, [(row.id, row.version - 1) for row in rows])
        return len(rows)

    def retire(self, cube_id: str, memory_ids: Sequence[str], reason: str) -> list[str]:
        """Soft-delete these live memories of the cube in one transaction, with `reason` in
        their history: the system path (no principal) lifecycle jobs take. Returns the ids
        deleted; ones already deleted or gone are skipped, so a rerun changes nothing."""
        if not memory_ids:
            return []
        with self.indexes.writing(cube_id) as index:
            with self.db.write() as s:
                lock_cube(s, cube_id)
                rows = list(
                    s.scalars(
                        select(Memory)
                        .where(
                            Memory.cube_id == cube_id,
                            Memory.id.in_(memory_ids),
                            Memory.deleted_at.is_(None),
                        )
                        .order_by(Memory.seq)
                        .with_for_update()
                    )
                )
                if not rows:
                    return []
                generation = _soft_delete(s, cube_id, rows, reason)
            index.apply([], [row.seq for row in rows], generation)
        self.on_changed(cube_id, [(row.id, row.version - 1) for row in rows])
        return [row.id for row in rows]

    # -- reads ------------------------------------------------------------------------------

    def _live_row(
        self, s: Session, cube_id: str, memory_id: str, for_update: bool = False
    ) -> Memory:
        query = select(Memory).where(
            Memory.id == memory_id, Memory.cube_id == cube_id, Memory.deleted_at.is_(None)
        )
        # In a write: lock the row (PostgreSQL), so a version check holds until the commit;
        # the cube's row first, as every write does (memos/db/locking.py).
        if for_update:
            lock_cube(s, cube_id)
        row = s.scalar(query.with_for_update() if for_update else query)
        if row is None:
            raise memory_not_found(memory_id)
        return row

    def get(self, principal: Principal, cube_id: str, memory_id: str) -> MemoryView:
        self.cubes.require(principal, cube_id, Role.READER)
        with self.db.read() as s:
            (view,) = memory_views(s, [self._live_row(s, cube_id, memory_id)])
        return view

    def page(
        self,
        principal: Principal,
        cube_id: str,
        session_id: str | None,
        limit: int,
        cursor: str | None,
    ) -> Page[MemoryView]:
        self.cubes.require(principal, cube_id, Role.READER)
        after = decode_cursor(cursor)
        query = select(Memory).where(Memory.cube_id == cube_id, Memory.deleted_at.is_(None))
        if session_id is not None:
            query = query.where(Memory.session_id == session_id)
        if after is not None:
            query = query.where(Memory.seq > after)
        with self.db.read() as s:
            rows = list(s.scalars(query.order_by(Memory.seq).limit(limit + 1)))
            more = len(rows) > limit
            rows = rows[:limit]
            items = memory_views(s, rows)
        next_cursor = encode_cursor(rows[-1].seq) if more and rows else None
        return Page(items=items, next_cursor=next_cursor)

    def history(self, principal: Principal, cube_id: str, memory_id: str) -> list[HistoryView]:
        """Every version, oldest first; still readable after the memory is deleted."""
        self.cubes.require(principal, cube_id, Role.READER)
        with self.db.read() as s:
            seq = s.scalar(
                select(Memory.seq).where(Memory.id == memory_id, Memory.cube_id == cube_id)
            )
            if seq is None:
                raise memory_not_found(memory_id)
            rows = s.scalars(
                select(MemoryHistory)
                .where(MemoryHistory.memory_seq == seq)
                .order_by(MemoryHistory.version)
            ).all()
        return [
            HistoryView(
                version=h.version,
                content=h.content,
                keywords=list(h.keywords or []),
                dates=[date.fromisoformat(d) for d in h.dates or []],
                tags=list(h.tags or []),
                context=h.context or "",
                metadata=h.metadata_ or {},
                changed_at=h.changed_at,
                reason=h.reason,
            )
            for h in rows
        ]


def _soft_delete(s: Session, cube_id: str, rows: Sequence[Memory], reason: str) -> int:
    """Soft-delete live `rows` of the cube in the open transaction (a new version each, with
    `reason` in its history); the cube's new generation, for the index."""
    generation = bump_generation(s, cube_id, live_delta=-len(rows))
    now = utcnow()
    for row in rows:
        row.version += 1
        row.change_seq = generation
        row.updated_at = row.deleted_at = now
        s.add(history_row(row, reason))
    return generation
