"""Enrichment state of each memory: notes are enriched and linked off the request path.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-22
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("memories", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("enrichment", sa.String(length=16), nullable=False, server_default="pending")
        )
        batch_op.add_column(sa.Column("enriched_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.create_index("ix_memories_enrichment", ["enrichment", "seq"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("memories", schema=None) as batch_op:
        batch_op.drop_index("ix_memories_enrichment")
        batch_op.drop_column("enriched_at")
        batch_op.drop_column("enrichment")
