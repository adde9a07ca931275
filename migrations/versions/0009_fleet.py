"""Fleet: several daemons on one database.

`instances` holds each daemon's identity and lease (renewed by its heartbeat); work a daemon
owns records its instance id, and another daemon takes that work over only once the owner's
lease has expired. `leases` holds named fleet-wide leases (the scheduler's leader). Memories
get an enrichment claim (`claimed_by` until `claimed_until`), chats a turn lock (`turn_holder`
until `turn_until`), activation builds and job runs the instance running them.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-05
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

WHEN = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "instances",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("host", sa.String(length=200), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("url", sa.String(length=300), nullable=True),
        sa.Column("started_at", WHEN, nullable=False),
        sa.Column("heartbeat_at", WHEN, nullable=False),
        sa.Column("lease_until", WHEN, nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_table(
        "leases",
        sa.Column("name", sa.String(length=100), nullable=False),
        sa.Column("holder", sa.String(length=40), nullable=False),
        sa.Column("acquired_at", WHEN, nullable=False),
        sa.Column("expires_at", WHEN, nullable=False),
        sa.PrimaryKeyConstraint("name"),
    )
    with op.batch_alter_table("memories", schema=None) as batch_op:
        batch_op.add_column(sa.Column("claimed_by", sa.String(length=40), nullable=True))
        batch_op.add_column(sa.Column("claimed_until", WHEN, nullable=True))
    with op.batch_alter_table("activations", schema=None) as batch_op:
        batch_op.add_column(sa.Column("instance_id", sa.String(length=40), nullable=True))
    with op.batch_alter_table("job_runs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("instance_id", sa.String(length=40), nullable=True))
    with op.batch_alter_table("chats", schema=None) as batch_op:
        batch_op.add_column(sa.Column("turn_holder", sa.String(length=40), nullable=True))
        batch_op.add_column(sa.Column("turn_until", WHEN, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("chats", schema=None) as batch_op:
        batch_op.drop_column("turn_until")
        batch_op.drop_column("turn_holder")
    with op.batch_alter_table("job_runs", schema=None) as batch_op:
        batch_op.drop_column("instance_id")
    with op.batch_alter_table("activations", schema=None) as batch_op:
        batch_op.drop_column("instance_id")
    with op.batch_alter_table("memories", schema=None) as batch_op:
        batch_op.drop_column("claimed_until")
        batch_op.drop_column("claimed_by")
    op.drop_table("leases")
    op.drop_table("instances")
