"""shard leases and worker heartbeats

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-03
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("ingest_shards") as t:
        t.add_column(sa.Column("worker", sa.String(255)))
        t.add_column(sa.Column("heartbeat_at", sa.DateTime(timezone=True)))
        t.add_column(sa.Column("queued_at", sa.DateTime(timezone=True)))
    op.create_table(
        "workers",
        sa.Column("name", sa.String(255), primary_key=True),
        sa.Column("queues", sa.String(255), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("workers")
    with op.batch_alter_table("ingest_shards") as t:
        t.drop_column("queued_at")
        t.drop_column("heartbeat_at")
        t.drop_column("worker")
