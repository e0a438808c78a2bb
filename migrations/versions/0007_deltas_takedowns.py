"""delta versions (a parent and the points deleted in place since) and takedowns with their keys

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-06
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("memory_versions") as t:
        t.add_column(sa.Column("parent_version", sa.Integer(), nullable=True))
        t.add_column(sa.Column("items_forgotten", sa.Integer(), nullable=False, server_default="0"))
    op.create_table(
        "takedowns",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("memory_id", sa.Integer(), sa.ForeignKey("memories.id", ondelete="CASCADE"), nullable=False),
        sa.Column("scope", sa.String(16), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("keys_count", sa.Integer(), nullable=False),
        sa.Column("keys_sha256", sa.String(64), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("progress", sa.JSON(), nullable=False),
        sa.Column("new_version", sa.Integer(), nullable=True),
        sa.Column("points_removed", sa.Integer(), nullable=False),
        sa.Column("caches_dropped", sa.Integer(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
    )
    op.create_table(
        "takedown_keys",
        sa.Column("takedown_id", sa.Integer(), sa.ForeignKey("takedowns.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("key", sa.String(512), primary_key=True),
    )
    op.create_index("ix_takedown_keys_key", "takedown_keys", ["key"])


def downgrade() -> None:
    op.drop_index("ix_takedown_keys_key", table_name="takedown_keys")
    op.drop_table("takedown_keys")
    op.drop_table("takedowns")
    with op.batch_alter_table("memory_versions") as t:
        t.drop_column("items_forgotten")
        t.drop_column("parent_version")
