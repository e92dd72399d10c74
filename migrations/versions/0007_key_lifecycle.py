"""key_lifecycle: API key expiry, model allow-list, limits and usage; per-minute usage; admin sessions

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-24 09:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    with op.batch_alter_table("api_keys", schema=None) as batch_op:
        batch_op.add_column(sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("models", JSON, nullable=True))
        batch_op.add_column(sa.Column("rpm_limit", sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column("tpm_limit", sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column("token_budget", sa.BigInteger(), nullable=True))
        # existing keys start with no usage recorded
        batch_op.add_column(sa.Column("requests_total", sa.BigInteger(), server_default=sa.text("0"), nullable=False))
        batch_op.add_column(sa.Column("tokens_total", sa.BigInteger(), server_default=sa.text("0"), nullable=False))
        batch_op.add_column(sa.Column("rotated_from_id", sa.Uuid(), nullable=True))
    op.create_table(
        "key_usage",
        sa.Column("key_id", sa.Uuid(), nullable=False),
        sa.Column("minute", sa.BigInteger(), nullable=False),
        sa.Column("requests", sa.BigInteger(), nullable=False),
        sa.Column("tokens", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(["key_id"], ["api_keys.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("key_id", "minute"),
    )
    op.create_table(
        "admin_sessions",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("key_id", sa.Uuid(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_seen_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("ended_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(["key_id"], ["api_keys.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("admin_sessions", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_admin_sessions_key_id"), ["key_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("admin_sessions", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_admin_sessions_key_id"))
    op.drop_table("admin_sessions")
    op.drop_table("key_usage")
    with op.batch_alter_table("api_keys", schema=None) as batch_op:
        for column in ("rotated_from_id", "tokens_total", "requests_total", "token_budget", "tpm_limit",
                       "rpm_limit", "models", "revoked_at", "expires_at"):  # fmt: skip
            batch_op.drop_column(column)
