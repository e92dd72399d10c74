"""The eval page: the demo's result tables (Markdown written by the harness) and their plots."""

from __future__ import annotations

import re
from pathlib import Path

from litestar import Controller, get
from litestar.params import FromPath
from litestar.response import File, Template

import evals
from api.admin.views import markdown
from registry.errors import NotFound

RESULTS_DIR = Path(evals.__file__).parent / "results" / "demo"
_NAME = re.compile(r"^[a-z0-9_-]+$")


class EvalPage(Controller):
    path = "/admin/evals"

    @get("/")
    async def evals_page(self) -> Template:
        reports = []
        for md in sorted(RESULTS_DIR.glob("*.md")):
            plot = md.with_suffix(".png")
            reports.append(
                {"name": md.stem, "html": markdown(md.read_text()), "plot": plot.name if plot.exists() else None}
            )
        return Template("evals.html", context={"reports": reports, "folder": str(RESULTS_DIR)})

    @get("/plot/{name:str}")
    async def plot(self, name: FromPath[str]) -> File:
        stem = name.removesuffix(".png")
        path = RESULTS_DIR / f"{stem}.png"
        if not _NAME.match(stem) or not path.is_file():
            raise NotFound(f"no plot named {name!r}", param="name")
        return File(path, media_type="image/png", content_disposition_type="inline")
