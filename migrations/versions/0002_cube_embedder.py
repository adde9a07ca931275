"""Record which embedder vector space each cube's stored embeddings belong to.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("cubes", schema=None) as batch_op:
        batch_op.add_column(sa.Column("embedder", sa.String(length=200), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("cubes", schema=None) as batch_op:
        batch_op.drop_column("embedder")
