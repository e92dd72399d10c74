"""base_serving_settings: a served model's chat template (a name shipped with moerge) and vLLM tool-call parser

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-12 10:00:00

Both empty (NULL) on existing experts: each keeps its model's own chat template and no tool parser.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("experts", schema=None) as batch_op:
        batch_op.add_column(sa.Column("chat_template", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("tool_parser", sa.String(length=64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("experts", schema=None) as batch_op:
        batch_op.drop_column("tool_parser")
        batch_op.drop_column("chat_template")
