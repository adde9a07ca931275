"""Chats: conversations whose turns are memories of one session.

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-28
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

JSON = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql")


def upgrade() -> None:
    op.create_table(
        "chats",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("cube_id", sa.String(length=40), nullable=False),
        sa.Column("session_id", sa.String(length=200), nullable=False),
        sa.Column("system", sa.Text(), nullable=True),
        sa.Column("recall", JSON, nullable=False),
        sa.Column("max_context_tokens", sa.Integer(), nullable=False),
        sa.Column("sampling", JSON, nullable=False),
        sa.Column("window_from_seq", sa.BigInteger(), nullable=False, server_default="0"),
        sa.Column("prefix_activation_id", sa.String(length=40), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_active_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["cube_id"], ["cubes.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("chats", schema=None) as batch_op:
        batch_op.create_index("ix_chats_cube_created", ["cube_id", "created_at"])


def downgrade() -> None:
    with op.batch_alter_table("chats", schema=None) as batch_op:
        batch_op.drop_index("ix_chats_cube_created")
    op.drop_table("chats")
