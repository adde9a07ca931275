"""Lifecycle: usage counters on memories and activations, and per-cube policies with history.

`memories.recalls` / `last_recalled_at` count how often a note was among a search's top k or
recalled into a chat; `activations.uses` / `loads` how often an activation served a request and
was read from disk. `cube_policies` holds each cube's lifecycle policy, one row per change.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-05
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

JSON = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql")


def upgrade() -> None:
    with op.batch_alter_table("memories", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("recalls", sa.BigInteger(), nullable=False, server_default="0")
        )
        batch_op.add_column(sa.Column("last_recalled_at", sa.DateTime(timezone=True)))
    with op.batch_alter_table("activations", schema=None) as batch_op:
        batch_op.add_column(sa.Column("uses", sa.BigInteger(), nullable=False, server_default="0"))
        batch_op.add_column(sa.Column("loads", sa.BigInteger(), nullable=False, server_default="0"))
    op.create_table(
        "cube_policies",
        sa.Column("cube_id", sa.String(length=40), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("policy", JSON, nullable=False),
        sa.Column("changed_by", sa.String(length=40), nullable=False),
        sa.Column("changed_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["cube_id"], ["cubes.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("cube_id", "version"),
    )


def downgrade() -> None:
    op.drop_table("cube_policies")
    with op.batch_alter_table("activations", schema=None) as batch_op:
        batch_op.drop_column("loads")
        batch_op.drop_column("uses")
    with op.batch_alter_table("memories", schema=None) as batch_op:
        batch_op.drop_column("last_recalled_at")
        batch_op.drop_column("recalls")
