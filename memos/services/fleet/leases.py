"""Named fleet-wide leases in the database: one holder at a time, taken over once expired.

`try_acquire(name)` takes the lease or renews it for its holder, in one conditional UPDATE
(the row is there) or one INSERT (it is not; two daemons racing to insert it meet the primary
key, and the loser simply does not hold it). Works the same on SQLite and PostgreSQL; the
scheduler's leadership (`memos/scheduler/runner.py`) is such a lease.
"""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import or_, update
from sqlalchemy.exc import IntegrityError

from memos.db.engine import Database
from memos.db.models import Lease
from memos.db.types import utcnow


class Leases:
    def __init__(self, db: Database, holder: str) -> None:
        self.db = db
        self.holder = holder

    def try_acquire(self, name: str, ttl_s: float) -> bool:
        """Hold `name` for `ttl_s` more seconds if it is free, expired or already ours."""
        now = utcnow()
        until = now + timedelta(seconds=ttl_s)
        with self.db.write() as s:
            taken = s.execute(
                update(Lease)
                .where(
                    Lease.name == name,
                    or_(Lease.holder == self.holder, Lease.expires_at <= now),
                )
                .values(holder=self.holder, expires_at=until)
            )
            if taken.rowcount:  # type: ignore[attr-defined]
                return True
            if s.get(Lease, name) is not None:
                return False  # another daemon holds it
        try:
            with self.db.write() as s:
                s.add(Lease(name=name, holder=self.holder, acquired_at=now, expires_at=until))
        except IntegrityError:
            return False  # another daemon inserted it first
        return True

    def release(self, name: str) -> None:
        with self.db.write() as s:
            s.execute(
                update(Lease)
                .where(Lease.name == name, Lease.holder == self.holder)
                .values(expires_at=utcnow())
            )

    def holder_of(self, name: str) -> str | None:
        """The instance holding `name` now, if anyone does."""
        with self.db.read() as s:
            lease = s.get(Lease, name)
        if lease is None or lease.expires_at <= utcnow():
            return None
        return lease.holder
