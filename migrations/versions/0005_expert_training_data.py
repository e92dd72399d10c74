"""expert_training_data: training examples attached to an expert (PHATGOOSE gate training)

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-22 20:20:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "expert_training_data",
        sa.Column("expert_id", sa.Uuid(), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("rows", sa.Integer(), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["expert_id"], ["experts.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("expert_id"),
    )
    with op.batch_alter_table("expert_training_data", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_expert_training_data_sha256"), ["sha256"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("expert_training_data", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_expert_training_data_sha256"))
    op.drop_table("expert_training_data")
