"""The eval page: the results recorded in the registry (``moerge eval --record``, POST
/api/experts/{ref}/evals), paginated, then the demo's result tables (Markdown written by the harness) and
their plots."""

from __future__ import annotations

import re
from pathlib import Path

from litestar import Controller, get
from litestar.di import NamedDependency
from litestar.params import FromPath
from litestar.response import File, Template
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

import evals
from api.admin.views import PAGE_SIZE, Pager, markdown
from api.schemas import PageOffset
from core.errors import NotFound
from registry.models import EvalResult, Expert

RESULTS_DIR = Path(evals.__file__).parent / "results" / "demo"
_NAME = re.compile(r"^[a-z0-9_-]+$")


class EvalPage(Controller):
    path = "/admin/evals"

    @get("/")
    async def evals_page(self, db_session: NamedDependency[AsyncSession], offset: PageOffset = 0) -> Template:
        offset = max(0, offset)
        total = int(await db_session.scalar(select(func.count()).select_from(EvalResult)) or 0)
        recorded = (
            await db_session.execute(
                select(EvalResult, Expert.slug)
                .join(Expert, EvalResult.expert_id == Expert.id)
                .order_by(EvalResult.created_at.desc(), EvalResult.id.desc())
                .limit(PAGE_SIZE)
                .offset(offset)
            )
        ).all()
        reports = []
        for md in sorted(RESULTS_DIR.glob("*.md")):
            plot = md.with_suffix(".png")
            reports.append(
                {"name": md.stem, "html": markdown(md.read_text()), "plot": plot.name if plot.exists() else None}
            )
        return Template(
            "evals.html",
            context={
                "recorded": [{"expert": slug, "result": row} for row, slug in recorded],
                "pager": Pager(total, offset),
                "reports": reports,
                "folder": str(RESULTS_DIR),
            },
        )

    @get("/plot/{name:str}")
    async def plot(self, name: FromPath[str]) -> File:
        stem = name.removesuffix(".png")
        path = RESULTS_DIR / f"{stem}.png"
        if not _NAME.match(stem) or not path.is_file():
            raise NotFound(f"no plot named {name!r}", param="name")
        return File(path, media_type="image/png", content_disposition_type="inline")
