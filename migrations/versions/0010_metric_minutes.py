"""metric_minutes: per-minute request counts per model and routing counts per composition and expert

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-10 10:00:00

What the admin dashboard charts (the last hour): each process adds its counts once a minute with an upsert
that sums (registry/metrics.py), so several replicas writing the same minute add up. Rows past a bound are
deleted as they are written. Nothing to fill from older data.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "model_minutes",
        sa.Column("minute", sa.BigInteger(), nullable=False),
        sa.Column("model", sa.String(length=128), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("requests", sa.BigInteger(), nullable=False),
        sa.Column("errors", sa.BigInteger(), nullable=False),
        sa.Column("latency_s", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("minute", "model", "kind"),
    )
    op.create_table(
        "routing_minutes",
        sa.Column("minute", sa.BigInteger(), nullable=False),
        sa.Column("composition", sa.String(length=128), nullable=False),
        sa.Column("expert", sa.String(length=128), nullable=False),
        sa.Column("decisions", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("minute", "composition", "expert"),
    )


def downgrade() -> None:
    op.drop_table("routing_minutes")
    op.drop_table("model_minutes")
