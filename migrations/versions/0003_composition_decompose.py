"""compositions.decompose: route each numbered part of a query to its own expert

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-22 14:50:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("compositions", schema=None) as batch_op:
        batch_op.add_column(sa.Column("decompose", sa.Boolean(), nullable=False, server_default=sa.false()))


def downgrade() -> None:
    with op.batch_alter_table("compositions", schema=None) as batch_op:
        batch_op.drop_column("decompose")
