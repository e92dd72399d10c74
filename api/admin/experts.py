"""Experts: the filtered, paginated list; the card (fields, lineage, evals, model card, "try it"); the
registration form (upload an archive or import a server-side path) with errors beside their fields."""

from __future__ import annotations

import re
from typing import Any

from litestar import Controller, Request, Response, get, post
from litestar.datastructures import UploadFile
from litestar.di import NamedDependency, Provide
from litestar.params import FromPath, FromQuery
from litestar.plugins.htmx import HTMXRequest, HTMXTemplate
from litestar.response import Redirect, Template
from litestar.status_codes import HTTP_303_SEE_OTHER
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from api.admin.asking import ask
from api.admin.views import PAGE_SIZE, FormErrors, Pager, expert_picker, lineage_svg, markdown
from api.deps import provide_engine, provide_expert_service
from api.experts.intake import LIST_FIELDS, register_import, register_upload, spec_from_fields
from api.limits import upload_opt
from api.schemas import PageOffset, expert_out
from core.errors import MoergeError, ValidationFailed
from core.settings import Settings
from registry.cards import card_body
from registry.models import Expert, ExpertKind
from registry.schemas import ExpertPatch, decode_strict
from registry.services import ExpertService
from registry.store import ArtifactStore
from serving.engine import Engine

FORM_FIELDS = ("slug", "kind", "base", "description", "task_description", "skills", "example_prompts", "tags")
# what the card's edit form changes: the ExpertPatch fields that describe and route the expert
EDIT_FIELDS = ("description", "task_description", "skills", "domains", "example_prompts", "tags", "aliases")
_SPLIT = re.compile(r"[\n,]")
_LINES = ("example_prompts",)  # one item a line (prompts may hold commas); other lists: commas or lines


def _items(name: str, value: str) -> list[str]:
    """A list field's text as its items."""
    parts = value.splitlines() if name in _LINES else _SPLIT.split(value)
    return [item.strip() for item in parts if item.strip()]


def _form_pairs(form: Any) -> tuple[str, list[tuple[str, Any]]]:
    """The registration form as the intake's (field, value) pairs, list fields split into items."""
    mode = str(form.get("mode") or "upload")
    pairs: list[tuple[str, Any]] = []
    for name in FORM_FIELDS:
        value = str(form.get(name) or "").strip()
        if name in LIST_FIELDS:
            pairs += [(name, item) for item in _items(name, value)]
        elif value:
            pairs.append((name, value))
    if mode == "upload":
        pairs += [("archive", f) for f in form.getall("archive", []) if isinstance(f, UploadFile) and f.filename]
    return mode, pairs


def _patch_data(form: Any) -> dict[str, Any]:
    """The edit form as the API's PATCH body (every field sent: an emptied list clears it)."""
    return {
        name: _items(name, str(form.get(name) or "")) if name in LIST_FIELDS else str(form.get(name) or "").strip()
        for name in EDIT_FIELDS
    }


def _edit_values(expert: Expert) -> dict[str, str]:
    """The expert's editable fields as the edit form shows them."""
    values = {}
    for name in EDIT_FIELDS:
        value = getattr(expert, name)
        if name in LIST_FIELDS:
            value = ("\n" if name in _LINES else ", ").join(value or [])
        values[name] = value or ""
    return values


async def _lineage(db_session: AsyncSession, expert: Expert) -> dict[str, Any]:
    rows = (await db_session.execute(select(Expert.id, Expert.slug, Expert.base_id, Expert.parents))).all()
    slugs = {str(row.id): row.slug for row in rows}
    parents = [slugs.get(str(p), str(p)[:8]) for p in expert.parents or []]
    me = str(expert.id)
    children = [r.slug for r in rows if str(r.base_id) == me or me in [str(p) for p in r.parents or []]]
    return lineage_svg(expert, parents, children)


class ExpertPages(Controller):
    path = "/admin/experts"
    dependencies = {"experts": Provide(provide_expert_service, sync_to_thread=False)}

    @get("/")
    async def list_page(
        self,
        experts: NamedDependency[ExpertService],
        kind: FromQuery[str | None] = None,
        q: FromQuery[str | None] = None,
        offset: PageOffset = 0,
    ) -> Template:
        kind = kind or None
        page = await experts.list_experts(kind=kind, text=q, limit=PAGE_SIZE, offset=max(0, offset))
        return Template(
            "experts.html",
            context={
                "experts": page.items,
                "kinds": [k.value for k in ExpertKind],
                "kind": kind or "",
                "q": q or "",
                "pager": Pager(page.total, page.offset, PAGE_SIZE, {"kind": kind or "", "q": q or ""}),
            },
        )

    async def _form(
        self, experts: ExpertService, values: dict[str, Any], errors: FormErrors, status: int = 200
    ) -> Template:
        bases = await expert_picker(experts, [k.value for k in ExpertKind if k != ExpertKind.adapter])
        return Template(
            "register.html",
            context={"values": values, "errors": errors, "kinds": [k.value for k in ExpertKind], "bases": bases},
            status_code=status,
        )

    @get("/new")
    async def register_form(self, experts: NamedDependency[ExpertService]) -> Template:
        return await self._form(experts, {"mode": "upload"}, FormErrors())

    # An upload: up to MOERGE_MAX_UPLOAD_BYTES once the session is checked (api/admin's gate, api/limits.py).
    @post("/new", opt=upload_opt(), request_max_body_size=None)
    async def register(
        self,
        request: Request[Any, Any, Any],
        experts: NamedDependency[ExpertService],
        settings: NamedDependency[Settings],
    ) -> Response[Any]:
        form = await request.form()
        mode, pairs = _form_pairs(form)
        values = {name: str(form.get(name) or "") for name in (*FORM_FIELDS, "path")} | {"mode": mode}
        file_field = "archive" if mode == "upload" else "path"
        try:
            if mode == "import":
                path = str(form.get("path") or "").strip()
                if not path:
                    raise ValidationFailed("give a folder path under an import root", param="path")
                expert = await register_import(experts, settings, path, spec_from_fields(pairs))
            else:
                expert = await register_upload(experts, settings, pairs)
        except MoergeError as exc:
            await experts.session.rollback()
            names = {n: n for n in (*FORM_FIELDS, "path", "archive")} | {"files": file_field, "folder": file_field}
            errors = FormErrors.of(exc, names, default=file_field)
            return await self._form(experts, values, errors, status=exc.status_code)
        return Redirect(f"/admin/experts/{expert.slug}", status_code=HTTP_303_SEE_OTHER)

    @get("/{ref:str}")
    async def card(
        self,
        ref: FromPath[str],
        db_session: NamedDependency[AsyncSession],
        experts: NamedDependency[ExpertService],
    ) -> Template:
        expert = await experts.get(ref)
        return Template("expert.html", context=await self._card(db_session, expert))

    async def _card(self, db_session: AsyncSession, expert: Expert, **extra: Any) -> dict[str, Any]:
        return {
            "expert": expert,
            "summary": expert_out(expert),
            "lineage": await _lineage(db_session, expert),
            "evals": sorted(expert.evals, key=lambda r: (r.task, r.metric)),
            "card_html": markdown(card_body(expert), shift=2),
            "message": "",
            "answer": None,
            "error": None,
            "edit": _edit_values(expert),
            "edit_errors": FormErrors(),
            **extra,
        }

    @post("/{ref:str}/try")
    async def try_it(
        self,
        ref: FromPath[str],
        request: HTMXRequest,
        db_session: NamedDependency[AsyncSession],
        store: NamedDependency[ArtifactStore],
        settings: NamedDependency[Settings],
        experts: NamedDependency[ExpertService],
    ) -> Template:
        """The answer as a fragment (HTMX), or the whole card with it (a plain form post)."""
        expert = await experts.get(ref)
        message = str((await request.form()).get("message") or "")
        answer, error = None, None
        try:
            answer = await ask(request, db_session, expert.slug, message)
        except MoergeError as exc:
            error = exc.message
        context = {"message": message, "answer": answer, "error": error}
        if request.htmx:
            return HTMXTemplate(template_name="fragments/answer.html", context=context)
        return Template("expert.html", context=await self._card(db_session, expert, **context))

    @post("/{ref:str}/edit")
    async def edit(
        self,
        ref: FromPath[str],
        request: Request[Any, Any, Any],
        db_session: NamedDependency[AsyncSession],
        experts: NamedDependency[ExpertService],
    ) -> Response[Any]:
        """Change the card's descriptive and routing fields through the API's PATCH; a refusal shows the
        card again with the error beside the field."""
        form = await request.form()
        try:
            expert = await experts.patch(ref, decode_strict(_patch_data(form), ExpertPatch))
        except MoergeError as exc:
            await db_session.rollback()
            expert = await experts.get(ref)
            values = {name: str(form.get(name) or "") for name in EDIT_FIELDS}
            errors = FormErrors.of(exc, {n: n for n in EDIT_FIELDS})
            context = await self._card(db_session, expert, edit=values, edit_errors=errors)
            return Template("expert.html", context=context, status_code=exc.status_code)
        return Redirect(f"/admin/experts/{expert.slug}", status_code=HTTP_303_SEE_OTHER)

    async def _delete_page(
        self, db_session: AsyncSession, experts: ExpertService, expert: Expert, error: str | None, status: int = 200
    ) -> Template:
        built_on = list(await db_session.scalars(select(Expert.slug).where(Expert.base_id == expert.id)))
        context = {
            "expert": expert,
            "built_on": built_on,
            "references": await experts.references(expert),
            "error": error,
        }
        return Template("expert_delete.html", context=context, status_code=status)

    @get("/{ref:str}/delete")
    async def delete_form(
        self,
        ref: FromPath[str],
        db_session: NamedDependency[AsyncSession],
        experts: NamedDependency[ExpertService],
    ) -> Template:
        """The confirmation step (a page, so it works without JavaScript): what still depends on it."""
        return await self._delete_page(db_session, experts, await experts.get(ref), None)

    @post("/{ref:str}/delete", dependencies={"engine": Provide(provide_engine, sync_to_thread=False)})
    async def delete(
        self,
        ref: FromPath[str],
        request: Request[Any, Any, Any],
        db_session: NamedDependency[AsyncSession],
        experts: NamedDependency[ExpertService],
        engine: NamedDependency[Engine],
    ) -> Response[Any]:
        force = (await request.form()).get("force") == "on"
        try:
            expert_id, names = await experts.delete(ref, force=force)
        except MoergeError as exc:  # still in use: refused as the API refuses, shown on the confirmation page
            await db_session.rollback()
            expert = await experts.get(ref)
            return await self._delete_page(db_session, experts, expert, exc.message, exc.status_code)
        await engine.forget(expert_id, names)  # as the API does: off the servers that hold it
        return Redirect("/admin/experts/", status_code=HTTP_303_SEE_OTHER)
