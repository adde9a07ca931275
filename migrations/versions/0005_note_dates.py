"""Resolved dates get their own column; failed enrichments are retried with backoff.

Dates enrichment resolved ("yesterday" said on 8 May 2023 -> "2023-05-07") were stored among a
note's keywords, where they made `same_entity` links between notes that shared nothing but a
day. They move to `dates` (memories and their history), in the order they were listed.

Enrichment failures are now retried by the `enrichment_retry` job: `enrichment_attempts`
(failed attempts), `enrichment_next_at` (when the next is due) and `enrichment_error` (the last
error). Notes an older daemon parked as `failed` after a single failed batch get their retries:
they become `retrying`, due at once.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-29
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

JSON = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql")
ISO_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")
CHUNK = 1000


def _table(name: str, key: str) -> sa.TableClause:
    return sa.table(
        name, sa.column(key, sa.BigInteger), sa.column("keywords", JSON), sa.column("dates", JSON)
    )


def _rewrite(name: str, key: str, move: Any, upgrading: bool) -> None:
    """Rewrite (keywords, dates) of every row that may need it, in chunks by key so a large
    table is never read at once. `move(keywords, dates)` -> the new pair."""
    table = _table(name, key)
    pk = table.c[key]
    conn = op.get_bind()
    candidate = (
        sa.cast(table.c.keywords, sa.Text).like("%____-__-__%")
        if upgrading
        else sa.cast(table.c.dates, sa.Text) != "[]"
    )
    last = -1
    while True:
        rows = conn.execute(
            sa.select(pk, table.c.keywords, table.c.dates)
            .where(pk > last, candidate)
            .order_by(pk)
            .limit(CHUNK)
        ).all()
        if not rows:
            return
        last = rows[-1][0]
        changes = []
        for row_key, keywords, dates in rows:
            new_keywords, new_dates = move(list(keywords or []), list(dates or []))
            if new_keywords != list(keywords or []) or new_dates != list(dates or []):
                changes.append({"k": row_key, "kw": new_keywords, "d": new_dates})
        if changes:
            conn.execute(
                sa.update(table)
                .where(pk == sa.bindparam("k"))
                .values(
                    keywords=sa.bindparam("kw", type_=JSON), dates=sa.bindparam("d", type_=JSON)
                ),
                changes,
            )


def _out_of_keywords(keywords: list[str], dates: list[str]) -> tuple[list[str], list[str]]:
    found = [k for k in keywords if isinstance(k, str) and ISO_DATE.fullmatch(k)]
    kept = [k for k in keywords if k not in found]
    return kept, [*dates, *(d for d in found if d not in dates)]


def _into_keywords(keywords: list[str], dates: list[str]) -> tuple[list[str], list[str]]:
    return [*keywords, *(d for d in dates if d not in keywords)], dates


def upgrade() -> None:
    # Plain ALTER TABLE, never a batch: on SQLite a batch would recreate `memories`, and
    # dropping the old table with foreign keys on cascades into its history and links.
    for name in ("memories", "memory_history"):
        op.add_column(name, sa.Column("dates", JSON, nullable=False, server_default="[]"))
    op.add_column(
        "memories",
        sa.Column("enrichment_attempts", sa.Integer(), nullable=False, server_default="0"),
    )
    op.add_column("memories", sa.Column("enrichment_next_at", sa.DateTime(timezone=True)))
    op.add_column("memories", sa.Column("enrichment_error", sa.Text(), nullable=True))
    _rewrite("memories", "seq", _out_of_keywords, upgrading=True)
    _rewrite("memory_history", "id", _out_of_keywords, upgrading=True)
    memories = sa.table(
        "memories",
        sa.column("enrichment", sa.String),
        sa.column("enrichment_attempts", sa.Integer),
        sa.column("enrichment_next_at", sa.DateTime(timezone=True)),
        sa.column("enrichment_error", sa.Text),
    )
    now = datetime.now(UTC)
    op.get_bind().execute(
        sa.update(memories)
        .where(memories.c.enrichment == "failed")
        .values(
            enrichment="retrying",
            enrichment_attempts=1,
            enrichment_next_at=now.replace(tzinfo=None) if _sqlite() else now,
            enrichment_error="failed before retries existed",
        )
    )


def _sqlite() -> bool:
    return bool(op.get_bind().dialect.name == "sqlite")


def downgrade() -> None:
    _rewrite("memories", "seq", _into_keywords, upgrading=False)
    _rewrite("memory_history", "id", _into_keywords, upgrading=False)
    memories = sa.table("memories", sa.column("enrichment", sa.String))
    op.get_bind().execute(
        sa.update(memories).where(memories.c.enrichment == "retrying").values(enrichment="failed")
    )
    # SQLite >= 3.35 drops a column in place (see `upgrade` on why not a batch).
    for column in ("enrichment_error", "enrichment_next_at", "enrichment_attempts", "dates"):
        op.drop_column("memories", column)
    op.drop_column("memory_history", "dates")
