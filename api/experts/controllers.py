"""/api/experts: register (upload or import), list, get, card, patch, delete, evals, training data."""

from __future__ import annotations

from typing import Any

from litestar import Controller, Request, Response, delete, get, patch, post
from litestar.di import NamedDependency, Provide
from litestar.openapi import ResponseSpec
from litestar.params import FromPath, FromQuery
from litestar.status_codes import HTTP_201_CREATED, HTTP_204_NO_CONTENT

from api.deps import provide_engine, provide_expert_service
from api.experts.intake import register_import, register_upload
from api.limits import admin_upload, read_form, upload_opt
from api.schemas import (
    ExpertCard,
    ExpertOut,
    Page,
    PageLimit,
    PageOffset,
    TrainingData,
    TrainingDataInfo,
    expert_out,
    typed,
)
from api.security import require_admin, require_query
from core.errors import ValidationFailed
from core.settings import Settings
from registry.cards import card_body, card_metadata, render_card
from registry.schemas import EvalIn, ExpertPatch, ImportRequest, decode_strict
from registry.services import ExpertService
from registry.training_data import MAX_TRAINING_DATA_BYTES, TrainingDataService, parse_training_data
from serving.engine import Engine


class ExpertController(Controller):
    path = "/api/experts"
    tags = ["experts"]
    dependencies = {"experts": Provide(provide_expert_service, sync_to_thread=False)}

    @get("/", guards=[require_query])
    async def list_experts(
        self,
        experts: NamedDependency[ExpertService],
        kind: FromQuery[str | None] = None,
        base: FromQuery[str | None] = None,
        skill: FromQuery[str | None] = None,
        tag: FromQuery[str | None] = None,
        q: FromQuery[str | None] = None,
        limit: PageLimit = 50,
        offset: PageOffset = 0,
    ) -> Page[ExpertOut]:
        page = await experts.list_experts(
            kind=kind, base=base, skill=skill, tag=tag, text=q, limit=limit, offset=offset
        )
        return Page(data=[expert_out(e) for e in page.items], total=page.total, limit=page.limit, offset=page.offset)

    # An upload: up to MOERGE_MAX_UPLOAD_BYTES, once the admin key is checked (api/limits.py).
    @post("/", guards=[admin_upload], status_code=HTTP_201_CREATED, opt=upload_opt(), request_max_body_size=None)
    async def upload_expert(
        self,
        request: Request[Any, Any, Any],
        experts: NamedDependency[ExpertService],
        settings: NamedDependency[Settings],
    ) -> ExpertOut:
        """Register from a multipart upload: form fields of the spec plus `files` parts or one `archive`."""
        if request.content_type[0] != "multipart/form-data":
            raise ValidationFailed("send multipart/form-data (fields + `files` or `archive`)", param="content-type")
        form = await read_form(request)
        expert = await register_upload(experts, settings, list(form.multi_items()))
        return expert_out(expert)

    @post("/import", guards=[require_admin], status_code=HTTP_201_CREATED)
    async def import_expert(
        self,
        request: Request[Any, Any, Any],
        experts: NamedDependency[ExpertService],
        settings: NamedDependency[Settings],
    ) -> ExpertOut:
        """Register a folder that already lies under one of the configured import roots."""
        body: ImportRequest = decode_strict(await request.body(), ImportRequest)
        expert = await register_import(experts, settings, body.path, body.expert)
        return expert_out(expert)

    @get("/{ref:str}", guards=[require_query])
    async def get_expert(self, ref: FromPath[str], experts: NamedDependency[ExpertService]) -> ExpertOut:
        return expert_out(await experts.get(ref))

    # Response[Any]: markdown (the default) or, with ?format=json, an ExpertCard.
    @get(
        "/{ref:str}/card",
        guards=[require_query],
        responses={200: ResponseSpec(ExpertCard, description="With ?format=json; else text/markdown")},
    )
    async def get_card(
        self, ref: FromPath[str], experts: NamedDependency[ExpertService], format: FromQuery[str] = "markdown"
    ) -> Response[Any]:
        expert = await experts.get(ref)
        if format == "markdown":
            return Response(render_card(expert), media_type="text/markdown; charset=utf-8")
        if format == "json":
            return Response(
                ExpertCard(metadata=card_metadata(expert), body=card_body(expert), markdown=render_card(expert))
            )
        raise ValidationFailed("format must be `markdown` or `json`", param="format")

    @patch("/{ref:str}", guards=[require_admin])
    async def patch_expert(
        self, ref: FromPath[str], request: Request[Any, Any, Any], experts: NamedDependency[ExpertService]
    ) -> ExpertOut:
        changes: ExpertPatch = decode_strict(await request.body(), ExpertPatch)
        return expert_out(await experts.patch(ref, changes))

    @post("/{ref:str}/evals", guards=[require_admin], status_code=HTTP_201_CREATED)
    async def add_eval(
        self, ref: FromPath[str], request: Request[Any, Any, Any], experts: NamedDependency[ExpertService]
    ) -> ExpertOut:
        result: EvalIn = decode_strict(await request.body(), EvalIn)
        return expert_out(await experts.add_eval(ref, result))

    @delete(
        "/{ref:str}",
        guards=[require_admin],
        status_code=HTTP_204_NO_CONTENT,
        dependencies={"engine": Provide(provide_engine, sync_to_thread=False)},
    )
    async def delete_expert(
        self,
        ref: FromPath[str],
        experts: NamedDependency[ExpertService],
        engine: NamedDependency[Engine],
        force: FromQuery[bool] = False,
    ) -> None:
        """Delete an expert; an adapter is unloaded from the vLLM servers that hold it (remote ones included)."""
        expert_id, names = await experts.delete(ref, force=force)
        await engine.forget(expert_id, names)

    # Rows may pass the JSON limit: an upload of at most 64 MiB, once the admin key is checked.
    @post(
        "/{ref:str}/training-data",
        guards=[admin_upload],
        status_code=HTTP_201_CREATED,
        opt=upload_opt(MAX_TRAINING_DATA_BYTES, "training data: at most 64 MiB"),
        request_max_body_size=None,
    )
    async def put_training_data(
        self, ref: FromPath[str], request: Request[Any, Any, Any], experts: NamedDependency[ExpertService]
    ) -> TrainingDataInfo:
        """Attach training examples (JSONL or a JSON list of {prompt, answer} or {messages} rows), replacing
        any attached before. Every row is checked first: a bad one is refused naming its line (JSONL, from 1)
        or index (JSON list, from 0) and field, and nothing is stored. PHATGOOSE gates are trained on first
        use (routers/token/states.py), not here."""
        await experts.get(ref)  # 404 before reading a large body
        rows = parse_training_data(await request.body())
        info = await TrainingDataService(experts.session, experts.store).attach(ref, rows)
        return typed(info.as_dict(), TrainingDataInfo)

    # Response[Any]: JSON (a TrainingData) or, with ?format=jsonl, the stored JSONL.
    @get(
        "/{ref:str}/training-data",
        guards=[require_query],
        responses={200: ResponseSpec(TrainingData, description="With ?format=json (the default); else JSONL")},
    )
    async def get_training_data(
        self, ref: FromPath[str], experts: NamedDependency[ExpertService], format: FromQuery[str] = "json"
    ) -> Response[Any]:
        """The attached rows: `json` (info + rows) or `jsonl` (the stored canonical JSONL)."""
        service = TrainingDataService(experts.session, experts.store)
        rows = await service.rows(ref)
        info = await service.info(ref)
        assert info is not None
        if format == "jsonl":
            return Response(service.store.blob_path(info.sha256).read_bytes(), media_type="application/jsonl")
        if format == "json":
            return Response(typed({**info.as_dict(), "data": [r.as_json() for r in rows]}, TrainingData))
        raise ValidationFailed("format must be `json` or `jsonl`", param="format")
