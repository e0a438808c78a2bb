"""class sets: a memory row of kind `classes` (versioned, swapped and checked like a memory) and what built it

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-03
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("memories") as t:
        t.add_column(sa.Column("kind", sa.String(16), nullable=False, server_default="memory"))
    with op.batch_alter_table("memory_versions") as t:
        t.add_column(sa.Column("details", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("memory_versions") as t:
        t.drop_column("details")
    with op.batch_alter_table("memories") as t:
        t.drop_column("kind")
