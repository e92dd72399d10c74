"""merge_job_result_name: the slug a merge job will register, unique among queued and running jobs

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-23 05:50:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

PENDING = "status IN ('queued', 'running')"


def upgrade() -> None:
    with op.batch_alter_table("merge_jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("result_name", sa.String(length=128), nullable=True))
    # Existing jobs keep the name they were given in their params (config.name); should two pending jobs share
    # one (the race this index closes), only the older keeps it, or the index could not be built.
    jobs = sa.table("merge_jobs", sa.column("id", sa.Uuid()), sa.column("params", sa.JSON()),
                    sa.column("status", sa.String()), sa.column("created_at", sa.DateTime(timezone=True)),
                    sa.column("result_name", sa.String()))  # fmt: skip
    connection = op.get_bind()
    pending_names: set[str] = set()
    rows = connection.execute(sa.select(jobs.c.id, jobs.c.params, jobs.c.status).order_by(jobs.c.created_at))
    for job_id, params, status in rows.all():
        name = str(((params or {}).get("config") or {}).get("name") or "")[:128]
        if not name or (status in ("queued", "running") and name in pending_names):
            continue
        if status in ("queued", "running"):
            pending_names.add(name)
        connection.execute(jobs.update().where(jobs.c.id == job_id).values(result_name=name))
    with op.batch_alter_table("merge_jobs", schema=None) as batch_op:
        batch_op.create_index(
            "uq_merge_jobs_pending_result_name",
            ["result_name"],
            unique=True,
            sqlite_where=sa.text(PENDING),
            postgresql_where=sa.text(PENDING),
        )


def downgrade() -> None:
    with op.batch_alter_table("merge_jobs", schema=None) as batch_op:
        batch_op.drop_index("uq_merge_jobs_pending_result_name")
        batch_op.drop_column("result_name")
