"""Failed enrichment attempts: recorded on the note's row, retried with exponential backoff.

A note whose enrichment raised (even the `local` enricher failed, or linking or the commit did)
is not lost and does not block the queue: its row records the attempt (`enrichment_attempts`,
`enrichment_error`) and becomes `retrying` until `enrichment_next_at`, when the
`enrichment_retry` job takes it again. After `max_attempts` failed attempts it is parked as
`failed`, with its last error. A failure is recorded only on the version it was tried on: a
note edited meanwhile is a new version, pending on its own, and keeps no trace of it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import Select, select
from sqlalchemy.orm import Session

from memcube.errors import describe
from memos.db.models import Memory
from memos.settings import EnrichmentConfig

MAX_ERROR_CHARS = 500


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int  # failed attempts before a note is parked as "failed"
    base_s: float  # delay after the first failed attempt
    max_s: float  # the longest delay

    @classmethod
    def of(cls, config: EnrichmentConfig) -> RetryPolicy:
        return cls(config.max_attempts, config.retry_base_s, config.retry_max_s)

    def delay(self, attempts: int) -> timedelta:
        """The wait after `attempts` (>= 1) failed attempts: base * 2^(attempts - 1), capped."""
        return timedelta(seconds=min(self.base_s * 2.0 ** (attempts - 1), self.max_s))


def error_text(exc: BaseException) -> str:
    """One line for the row: "<ExceptionType>: <first line of its message>"."""
    return describe(exc, MAX_ERROR_CHARS)


def record_failures(
    s: Session,
    cube_id: str,
    tried: Mapping[int, int],
    errors: Mapping[int, str],
    policy: RetryPolicy,
    now: datetime,
    claimant: str | None = None,
) -> Counter[str]:
    """Record one failed attempt for each note in `errors` (seq -> error), if it is still at
    the version it was tried at (`tried`: seq -> version) and still waiting for enrichment.

    Returns how many became "retrying" and "failed"; notes edited, deleted or enriched
    meanwhile, or (with `claimant`) claimed meanwhile by another daemon than `claimant`, are
    counted as "stale" and left as they are.
    """
    outcome: Counter[str] = Counter()
    rows = s.scalars(
        select(Memory)
        .where(Memory.cube_id == cube_id, Memory.seq.in_(list(errors)))
        .with_for_update(key_share=True)
    ).all()
    for row in rows:
        if (
            row.deleted_at is not None
            or row.version != tried[row.seq]
            or row.enrichment not in ("pending", "retrying")
            or (claimant is not None and row.claimed_by != claimant)
        ):
            outcome["stale"] += 1
            continue
        row.enrichment_attempts = (row.enrichment_attempts or 0) + 1
        row.enrichment_error = errors[row.seq][:MAX_ERROR_CHARS]
        if row.enrichment_attempts >= policy.max_attempts:
            row.enrichment, row.enrichment_next_at = "failed", None
        else:
            row.enrichment = "retrying"
            row.enrichment_next_at = now + policy.delay(row.enrichment_attempts)
        outcome[row.enrichment] += 1
    outcome["stale"] += len(errors) - len(rows)  # gone with their cube
    return outcome


def due_query(now: datetime, limit: int) -> Select[int, str]:
    """(seq, cube_id) of the notes whose next attempt is due, the longest-waiting first."""
    return (
        select(Memory.seq, Memory.cube_id)
        .where(
            Memory.enrichment == "retrying",
            Memory.enrichment_next_at <= now,
            Memory.deleted_at.is_(None),
        )
        .order_by(Memory.enrichment_next_at, Memory.seq)
        .limit(limit)
    )
