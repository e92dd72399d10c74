"""registry_epoch: one counter bumped by every registry change (memo validation in one query)

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-22 15:20:00
"""

from __future__ import annotations

import uuid

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    table = op.create_table(
        "registry_epoch",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("instance", sa.String(length=36), nullable=False),
        sa.Column("value", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.bulk_insert(table, [{"id": 1, "instance": str(uuid.uuid4()), "value": 0}])


def downgrade() -> None:
    op.drop_table("registry_epoch")
