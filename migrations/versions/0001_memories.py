"""memories, memory versions, ingestion shards

Revision ID: 0001
Revises:
Create Date: 2026-11-29
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "memories",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("name", sa.String(64), nullable=False, unique=True),
        sa.Column("active_version_id", sa.Integer, nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "memory_versions",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("memory_id", sa.Integer, sa.ForeignKey("memories.id", ondelete="CASCADE"), nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("backbone", sa.Text, nullable=False),
        sa.Column("backbone_hash", sa.String(64)),
        sa.Column("dim", sa.Integer, nullable=False),
        sa.Column("source", sa.Text, nullable=False),
        sa.Column("source_format", sa.String(16), nullable=False),
        sa.Column("collection", sa.String(128), nullable=False),
        sa.Column("items_stored", sa.Integer, nullable=False),
        sa.Column("items_skipped", sa.Integer, nullable=False),
        sa.Column("activate_when_ready", sa.Integer, nullable=False),
        sa.Column("error", sa.Text),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("ready_at", sa.DateTime(timezone=True)),
        sa.Column("activated_at", sa.DateTime(timezone=True)),
        sa.UniqueConstraint("memory_id", "version", name="uq_memory_version"),
    )
    with op.batch_alter_table("memories") as batch:
        batch.create_foreign_key(
            "fk_memories_active_version", "memory_versions", ["active_version_id"], ["id"], ondelete="SET NULL"
        )
    op.create_table(
        "ingest_shards",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column(
            "version_id", sa.Integer, sa.ForeignKey("memory_versions.id", ondelete="CASCADE"), nullable=False
        ),
        sa.Column("index", sa.Integer, nullable=False),
        sa.Column("spec", sa.JSON, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("items_stored", sa.Integer, nullable=False),
        sa.Column("items_skipped", sa.Integer, nullable=False),
        sa.Column("skip_reasons", sa.JSON, nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("error", sa.Text),
        sa.Column("started_at", sa.DateTime(timezone=True)),
        sa.Column("finished_at", sa.DateTime(timezone=True)),
        sa.UniqueConstraint("version_id", "index", name="uq_shard_index"),
    )
    op.create_index("ix_ingest_shards_version_status", "ingest_shards", ["version_id", "status"])


def downgrade() -> None:
    op.drop_table("ingest_shards")
    with op.batch_alter_table("memories") as batch:
        batch.drop_constraint("fk_memories_active_version", type_="foreignkey")
    op.drop_table("memory_versions")
    op.drop_table("memories")
