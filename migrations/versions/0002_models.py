"""trained fusion models

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-29
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "models",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("name", sa.String(64), nullable=False, unique=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("backbone", sa.Text, nullable=False),
        sa.Column("backbone_hash", sa.String(64)),
        sa.Column("dim", sa.Integer, nullable=False),
        sa.Column("memory_name", sa.String(64), nullable=False),
        sa.Column("memory_version", sa.Integer, nullable=False),
        sa.Column("pairs_name", sa.String(64), nullable=False),
        sa.Column("pairs_version", sa.Integer, nullable=False),
        sa.Column("config", sa.JSON, nullable=False),
        sa.Column("checkpoint_dir", sa.Text, nullable=False),
        sa.Column("step", sa.Integer, nullable=False),
        sa.Column("metrics", sa.JSON, nullable=False),
        sa.Column("error", sa.Text),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("models")
