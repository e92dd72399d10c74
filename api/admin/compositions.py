"""Compositions: list, create, edit, delete, through the JSON API's service and router fitting."""

from __future__ import annotations

import json
from typing import Any

from litestar import Controller, Request, Response, get, post
from litestar.di import NamedDependency, Provide
from litestar.params import FromPath
from litestar.response import Redirect, Template
from litestar.status_codes import HTTP_303_SEE_OTHER
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from aggregators import AGGREGATORS
from api.admin.views import PAGE_SIZE, FormErrors, Pager, expert_picker, json_object, split_slugs
from api.deps import provide_router_context, wake_worker
from api.schemas import PageOffset, composition_out, struct_items
from composition.mixtures import queue_fit, router_fitter
from composition.service import CompositionPatch, CompositionService, CompositionSpec
from core.errors import MoergeError, ValidationFailed
from registry.models import Composition
from registry.schemas import decode_strict
from registry.store import ArtifactStore
from routers.query import ROUTERS, RouterContext
from routers.token import TOKEN_ROUTERS

FIELDS = (
    "name",
    "description",
    "router",
    "router_params",
    "experts",
    "k",
    "aggregator",
    "aggregator_params",
    "fallback",
    "decompose",
)
FIELD_OF = {n: n for n in FIELDS} | {"more_experts": "experts"}


def _experts(form: Any) -> list[str]:
    """The ticked candidates, then the typed ones (a slug past the picker's list), each once."""
    ticked = [str(e) for e in form.getall("experts", [])]
    return list(dict.fromkeys([*ticked, *split_slugs(str(form.get("more_experts") or ""))]))


def _spec_data(form: Any) -> dict[str, Any]:
    """The form as the API's JSON body (the same struct decodes and checks it)."""
    k_text = str(form.get("k") or "1").strip()
    if not k_text.lstrip("-").isdigit():
        raise ValidationFailed("k must be a whole number", param="k")
    return {
        "description": str(form.get("description") or ""),
        "router": str(form.get("router") or "direct"),
        "router_params": json_object(form, "router_params"),
        "experts": _experts(form),
        "k": int(k_text),
        "aggregator": str(form.get("aggregator") or "") or None,
        "aggregator_params": json_object(form, "aggregator_params"),
        "fallback": str(form.get("fallback") or "").strip() or None,
        "decompose": form.get("decompose") in ("on", "true", "1"),
    }


def _values(form: Any) -> dict[str, Any]:
    values: dict[str, Any] = {name: str(form.get(name) or "") for name in FIELDS}
    values["experts"] = [str(e) for e in form.getall("experts", [])]
    values["more_experts"] = str(form.get("more_experts") or "")
    values["decompose"] = form.get("decompose") in ("on", "true", "1")
    return values


def _compositions(
    db_session: NamedDependency[AsyncSession], store: NamedDependency[ArtifactStore]
) -> CompositionService:
    return CompositionService(db_session, store)


class CompositionPages(Controller):
    path = "/admin/compositions"
    dependencies = {
        "routing": Provide(provide_router_context, sync_to_thread=False),
        "compositions": Provide(_compositions, sync_to_thread=False),
    }

    @get("/")
    async def list_page(self, compositions: NamedDependency[CompositionService], offset: PageOffset = 0) -> Template:
        offset = max(0, offset)
        session = compositions.session
        total = int(await session.scalar(select(func.count()).select_from(Composition)) or 0)
        page = list(
            await session.scalars(select(Composition).order_by(Composition.name).limit(PAGE_SIZE).offset(offset))
        )
        rows = [await composition_out(compositions, c) for c in page]
        return Template("compositions.html", context={"compositions": rows, "pager": Pager(total, offset)})

    async def _form(
        self,
        compositions: CompositionService,
        values: dict[str, Any],
        errors: FormErrors,
        *,
        editing: str | None = None,
        status: int = 200,
    ) -> Template:
        picker = await expert_picker(compositions.experts)
        offered = {e.slug for e in picker.experts}
        # members past the picker's list are shown as typed slugs, so saving the form keeps them
        if beyond := [s for s in values.get("experts", []) if s not in offered]:
            typed = split_slugs(str(values.get("more_experts") or ""))
            values = values | {"more_experts": ", ".join(dict.fromkeys([*typed, *beyond]))}
        return Template(
            "composition_form.html",
            context={
                "values": values,
                "errors": errors,
                "editing": editing,
                "picker": picker,
                "routers": [*ROUTERS.names(), *TOKEN_ROUTERS.names()],
                "aggregators": AGGREGATORS.names(),
            },
            status_code=status,
        )

    @get("/new")
    async def new_form(self, compositions: NamedDependency[CompositionService]) -> Template:
        values = {"router": "embedding", "k": "1", "experts": [], "router_params": "", "aggregator_params": ""}
        return await self._form(compositions, values, FormErrors())

    async def _save(
        self, request: Request[Any, Any, Any], service: CompositionService, routing: RouterContext, editing: str | None
    ) -> Response[Any]:
        """Create (``editing`` None) or update a composition from the form; a refusal re-renders the form
        with the error beside its field."""
        form = await request.form()
        fit = router_fitter(service.session, service.experts.store, routing, defer_slow=True)
        try:
            if editing is None:
                data = {"name": str(form.get("name") or "").strip(), **_spec_data(form)}
                comp = await service.create(decode_strict(data, CompositionSpec), prepare=fit)
                target = f"/admin/playground?composition={comp.name}"
            else:
                comp = await service.update(editing, decode_strict(_spec_data(form), CompositionPatch), prepare=fit)
                target = "/admin/compositions/"
            if fit.deferred:  # a slow router trains in a `fit` job; its page follows it
                job = await queue_fit(service.session, comp.name, comp.router)
                wake_worker(request.app.state)
                target = f"/admin/merges/{job.id}"
        except MoergeError as exc:
            await service.session.rollback()
            errors = FormErrors.of(exc, FIELD_OF)
            values = _values(form) | ({"name": editing} if editing else {})
            return await self._form(service, values, errors, editing=editing, status=exc.status_code)
        return Redirect(target, status_code=HTTP_303_SEE_OTHER)

    @post("/new")
    async def create(
        self,
        request: Request[Any, Any, Any],
        compositions: NamedDependency[CompositionService],
        routing: NamedDependency[RouterContext],
    ) -> Response[Any]:
        return await self._save(request, compositions, routing, None)

    @get("/{name:str}/edit")
    async def edit_form(self, name: FromPath[str], compositions: NamedDependency[CompositionService]) -> Template:
        described = await composition_out(compositions, await compositions.get(name))
        values = {  # the form's fields, as text
            **{k: "" if v is None else v for k, v in struct_items(described)},
            "router_params": json.dumps(described.router_params) if described.router_params else "",
            "aggregator_params": json.dumps(described.aggregator_params) if described.aggregator_params else "",
            "k": str(described.k),
        }
        return await self._form(compositions, values, FormErrors(), editing=name)

    @post("/{name:str}/edit")
    async def update(
        self,
        name: FromPath[str],
        request: Request[Any, Any, Any],
        compositions: NamedDependency[CompositionService],
        routing: NamedDependency[RouterContext],
    ) -> Response[Any]:
        return await self._save(request, compositions, routing, name)

    @post("/{name:str}/delete")
    async def delete(self, name: FromPath[str], compositions: NamedDependency[CompositionService]) -> Redirect:
        await compositions.delete(name)
        return Redirect("/admin/compositions/", status_code=HTTP_303_SEE_OTHER)
