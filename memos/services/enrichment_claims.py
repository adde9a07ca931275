"""Enrichment claims: which daemon enriches a note now, and until when.

Several daemons on one database drain one queue of notes to enrich. A worker claims a batch in
one transaction: it selects notes nobody holds a live claim on (`claimed_until` unset or past)
and stamps them `claimed_by = <its instance>`, `claimed_until = now + lease`. On PostgreSQL the
select is `FOR NO KEY UPDATE SKIP LOCKED`, so workers claiming at once lock disjoint rows and never
wait for each other; on SQLite the write transaction (`BEGIN IMMEDIATE`) serializes claims and
the same statement runs without the clause. The claim is cleared when the batch is done,
failed or found stale. A note whose claimer died is claimable again once its lease is over;
a claimer that outlived its lease finds its notes claimed by another and leaves them alone
(the commit and the failure record check the claim, see memos/services/enrichment.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, Select, or_, update

from memos.db.engine import Database
from memos.db.locking import lock_memories
from memos.db.models import Memory
from memos.db.types import utcnow


def claimable(now: datetime) -> ColumnElement[bool]:
    """SQL: nobody holds a live claim on the note."""
    return or_(Memory.claimed_until.is_(None), Memory.claimed_until <= now)


class Claims:
    def __init__(self, db: Database, holder: str, lease_s: float) -> None:
        self.db = db
        self.holder = holder
        self.lease_s = lease_s

    def take(self, query: Select[int, str], now: datetime | None = None) -> list[tuple[int, str]]:
        """Claim the notes `query` selects, as (seq, cube_id) rows, among the claimable."""
        now = now or utcnow()
        query = query.where(claimable(now))
        with self.db.read() as s:  # an idle queue costs no write transaction (SQLite: lock)
            if s.execute(query.limit(1)).first() is None:
                return []
        if self.db.dialect == "postgresql":
            # NO KEY: inserts of links to these notes (foreign key checks) are not held up.
            query = query.with_for_update(skip_locked=True, key_share=True)
        with self.db.write() as s:
            taken = [(seq, cube_id) for seq, cube_id in s.execute(query)]
            if taken:
                s.execute(
                    update(Memory)
                    .where(Memory.seq.in_([seq for seq, _ in taken]))
                    .values(
                        claimed_by=self.holder,
                        claimed_until=now + timedelta(seconds=self.lease_s),
                    )
                )
        return taken

    def extend(self, seqs: Sequence[int]) -> None:
        """A fresh lease on the notes still claimed by this daemon (a long batch)."""
        if seqs:
            self._set(seqs, claimed_until=utcnow() + timedelta(seconds=self.lease_s))

    def release(self, seqs: Sequence[int]) -> None:
        """Clear the claims this daemon still holds on these notes."""
        if seqs:
            self._set(seqs, claimed_by=None, claimed_until=None)

    def release_all(self) -> None:
        """Clear every claim of this daemon (at start: its earlier self was cut short)."""
        with self.db.write() as s:
            lock_memories(s, Memory.claimed_by == self.holder)
            s.execute(
                update(Memory)
                .where(Memory.claimed_by == self.holder)
                .values(claimed_by=None, claimed_until=None)
            )

    def _set(self, seqs: Sequence[int], **values: Any) -> None:
        with self.db.write() as s:
            mine = (Memory.seq.in_(list(seqs)), Memory.claimed_by == self.holder)
            lock_memories(s, *mine)  # in seq order: see memos/db/locking.py
            s.execute(
                update(Memory)
                .where(Memory.seq.in_(list(seqs)), Memory.claimed_by == self.holder)
                .values(**values)
            )
