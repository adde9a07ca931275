"""API keys get a name; cubes count their live memories (for the memory quota).

`api_keys.name` lets a user tell their keys apart when listing and revoking them.
`cubes.live_memories` is kept by every write transaction from here on; this migration fills
it from the rows already stored.

Revision ID: 0006
Revises: 0004 (while developing; 0005 once the branch that adds 0005 is merged)
Create Date: 2026-11-23
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("api_keys", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("name", sa.String(length=200), nullable=False, server_default="")
        )
    with op.batch_alter_table("cubes", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("live_memories", sa.BigInteger(), nullable=False, server_default="0")
        )
    op.execute(
        "UPDATE cubes SET live_memories = (SELECT count(*) FROM memories"
        " WHERE memories.cube_id = cubes.id AND memories.deleted_at IS NULL)"
    )


def downgrade() -> None:
    with op.batch_alter_table("cubes", schema=None) as batch_op:
        batch_op.drop_column("live_memories")
    with op.batch_alter_table("api_keys", schema=None) as batch_op:
        batch_op.drop_column("name")
