"""expert_names: every name an expert answers to (its slug and aliases), unique in the database

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-08 10:00:00

Aliases were checked against other experts' names in Python only, so two racing writes could both take one.
The table is filled from the experts' rows. Names that already clash are settled, not left to crash the
migration halfway: a slug always keeps its name (it is the expert's identity); of two experts with the same
alias the older keeps it; the alias is dropped from the other expert's list and each drop is logged.
"""

from __future__ import annotations

import logging
from typing import Any

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
log = logging.getLogger("moerge.migrations")

experts = sa.table(
    "experts",
    sa.column("id", sa.Uuid()),
    sa.column("slug", sa.String()),
    sa.column("aliases", JSON),
    sa.column("created_at", sa.DateTime(timezone=True)),
)
expert_names = sa.table(
    "expert_names", sa.column("name", sa.String()), sa.column("expert_id", sa.Uuid()), sa.column("kind", sa.String())
)


def upgrade() -> None:
    op.create_table(
        "expert_names",
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("expert_id", sa.Uuid(), nullable=False),
        sa.Column("kind", sa.String(length=8), nullable=False),
        sa.ForeignKeyConstraint(["expert_id"], ["experts.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("name"),
    )
    with op.batch_alter_table("expert_names", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_expert_names_expert_id"), ["expert_id"], unique=False)
    _fill()


def _fill() -> None:
    bind = op.get_bind()
    rows = bind.execute(
        sa.select(experts.c.id, experts.c.slug, experts.c.aliases).order_by(experts.c.created_at, experts.c.id)
    ).all()
    owner: dict[str, Any] = {slug: expert_id for expert_id, slug, _ in rows}  # slugs are unique already
    names = [{"name": slug, "expert_id": expert_id, "kind": "slug"} for expert_id, slug, _ in rows]
    for expert_id, slug, aliases in rows:  # oldest first: the first to claim an alias keeps it
        kept: list[str] = []
        for alias in aliases or []:
            holder = owner.get(alias)
            if holder is not None and holder != expert_id:
                log.warning(
                    "expert %r (%s): alias %r dropped, already a name of expert %s", slug, expert_id, alias, holder
                )
                continue
            kept.append(alias)
            if holder is None:
                owner[alias] = expert_id
                names.append({"name": alias, "expert_id": expert_id, "kind": "alias"})
        if kept != list(aliases or []):
            bind.execute(sa.update(experts).where(experts.c.id == expert_id).values(aliases=kept))
    if names:
        bind.execute(expert_names.insert(), names)


def downgrade() -> None:
    # Aliases the upgrade dropped as duplicates are not given back: they named another expert.
    with op.batch_alter_table("expert_names", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_expert_names_expert_id"))
    op.drop_table("expert_names")
