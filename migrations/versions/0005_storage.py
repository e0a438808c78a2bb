"""per-version storage options: quantization and on-disk original vectors

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-03
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("memory_versions") as t:
        t.add_column(sa.Column("quantization", sa.String(8), nullable=False, server_default="none"))
        t.add_column(sa.Column("on_disk", sa.Boolean(), nullable=False, server_default=sa.false()))


def downgrade() -> None:
    with op.batch_alter_table("memory_versions") as t:
        t.drop_column("on_disk")
        t.drop_column("quantization")
