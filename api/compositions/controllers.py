"""/api/compositions: create, list, get, update, delete composed systems."""

from __future__ import annotations

from typing import Any

from litestar import Controller, Request, delete, get, patch, post
from litestar.di import NamedDependency
from litestar.params import FromPath
from litestar.status_codes import HTTP_201_CREATED, HTTP_204_NO_CONTENT
from sqlalchemy.ext.asyncio import AsyncSession

from api.security import require_admin, require_query
from registry.compositions import CompositionPatch, CompositionService, CompositionSpec
from registry.schemas import decode_strict
from registry.store import ArtifactStore


def _service(db_session: AsyncSession, store: ArtifactStore) -> CompositionService:
    return CompositionService(db_session, store)


class CompositionController(Controller):
    path = "/api/compositions"
    tags = ["compositions"]

    @get("/", guards=[require_query])
    async def list_compositions(
        self, db_session: NamedDependency[AsyncSession], store: NamedDependency[ArtifactStore]
    ) -> dict[str, Any]:
        service = _service(db_session, store)
        return {"object": "list", "data": [await service.describe(c) for c in await service.list_compositions()]}

    @post("/", guards=[require_admin], status_code=HTTP_201_CREATED)
    async def create_composition(
        self,
        request: Request[Any, Any, Any],
        db_session: NamedDependency[AsyncSession],
        store: NamedDependency[ArtifactStore],
    ) -> dict[str, Any]:
        spec: CompositionSpec = decode_strict(await request.body(), CompositionSpec)
        service = _service(db_session, store)
        return await service.describe(await service.create(spec))

    @get("/{name:str}", guards=[require_query])
    async def get_composition(
        self, name: FromPath[str], db_session: NamedDependency[AsyncSession], store: NamedDependency[ArtifactStore]
    ) -> dict[str, Any]:
        service = _service(db_session, store)
        return await service.describe(await service.get(name))

    @patch("/{name:str}", guards=[require_admin])
    async def update_composition(
        self,
        name: FromPath[str],
        request: Request[Any, Any, Any],
        db_session: NamedDependency[AsyncSession],
        store: NamedDependency[ArtifactStore],
    ) -> dict[str, Any]:
        changes: CompositionPatch = decode_strict(await request.body(), CompositionPatch)
        service = _service(db_session, store)
        return await service.describe(await service.update(name, changes))

    @delete("/{name:str}", guards=[require_admin], status_code=HTTP_204_NO_CONTENT)
    async def delete_composition(
        self, name: FromPath[str], db_session: NamedDependency[AsyncSession], store: NamedDependency[ArtifactStore]
    ) -> None:
        await _service(db_session, store).delete(name)
