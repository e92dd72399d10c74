"""jobs: the merge jobs table becomes the one jobs table (kinds merge, train, fit) with a worker's lease

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-06 15:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
PENDING = "status IN ('queued', 'running')"


def _rename(old: str, new: str, indexes: list[tuple[str, str, list[str], bool, str | None]]) -> None:
    """Rename a table and its indexes (``(old name, new name, columns, unique, where)``): the indexes are
    dropped and made again under their new names, which works the same on SQLite and PostgreSQL; the foreign
    keys pointing at the table follow the rename on both."""
    for old_index, _, _, _, _ in indexes:
        op.drop_index(old_index, table_name=old)
    op.rename_table(old, new)
    for _, new_index, columns, unique, where in indexes:
        extra = {"sqlite_where": sa.text(where), "postgresql_where": sa.text(where)} if where else {}
        op.create_index(new_index, new, columns, unique=unique, **extra)


def upgrade() -> None:
    _rename(
        "merge_jobs",
        "jobs",
        [
            ("ix_merge_jobs_status", "ix_jobs_status", ["status"], False, None),
            ("uq_merge_jobs_pending_result_name", "uq_jobs_pending_result_name", ["result_name"], True, PENDING),
        ],
    )
    _rename(
        "merge_job_inputs",
        "job_inputs",
        [("ix_merge_job_inputs_expert_id", "ix_job_inputs_expert_id", ["expert_id"], False, None)],
    )
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        # every job so far was a merge
        batch_op.add_column(sa.Column("kind", sa.String(length=16), nullable=False, server_default="merge"))
        batch_op.add_column(sa.Column("owner", sa.String(length=128), nullable=True))
        batch_op.add_column(sa.Column("attempts", sa.Integer(), nullable=False, server_default="0"))
        batch_op.add_column(sa.Column("result", JSON, nullable=True))
    op.create_index("ix_jobs_kind", "jobs", ["kind"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_jobs_kind", table_name="jobs")
    op.execute(sa.text("DELETE FROM jobs WHERE kind != 'merge'"))  # the old table knew merges only
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("result")
        batch_op.drop_column("attempts")
        batch_op.drop_column("owner")
        batch_op.drop_column("kind")
    _rename(
        "job_inputs",
        "merge_job_inputs",
        [("ix_job_inputs_expert_id", "ix_merge_job_inputs_expert_id", ["expert_id"], False, None)],
    )
    _rename(
        "jobs",
        "merge_jobs",
        [
            ("ix_jobs_status", "ix_merge_jobs_status", ["status"], False, None),
            ("uq_jobs_pending_result_name", "uq_merge_jobs_pending_result_name", ["result_name"], True, PENDING),
        ],
    )
