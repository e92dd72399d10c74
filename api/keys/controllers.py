"""/api/keys (admin scope): list, create, get, revoke (DELETE) and rotate API keys."""

from __future__ import annotations

from typing import Any

from litestar import Controller, Request, delete, get, post
from litestar.di import NamedDependency
from litestar.params import FromPath, FromQuery
from litestar.status_codes import HTTP_200_OK, HTTP_201_CREATED

from api.keys.schemas import KeyCreate, KeyCreated, KeyOut, created, describe
from api.schemas import Page, PageLimit, PageOffset
from api.security import require_admin
from registry.keys import ApiKeyService
from registry.schemas import decode_strict


class KeyController(Controller):
    path = "/api/keys"
    tags = ["keys"]
    guards = [require_admin]

    @get("/")
    async def list_keys(
        self,
        keys: NamedDependency[ApiKeyService],
        limit: PageLimit = 50,
        offset: PageOffset = 0,
        include_revoked: FromQuery[bool] = True,
    ) -> Page[KeyOut]:
        page = await keys.list_keys(limit=limit, offset=offset, include_revoked=include_revoked)
        minutes = await keys.window_usage([k.id for k in page.items])
        return Page(
            data=[describe(k, minutes.get(k.id)) for k in page.items],
            total=page.total,
            limit=page.limit,
            offset=page.offset,
        )

    @post("/", status_code=HTTP_201_CREATED)
    async def create_key(self, request: Request[Any, Any, Any], keys: NamedDependency[ApiKeyService]) -> KeyCreated:
        """A new key; its secret is in this answer only."""
        body: KeyCreate = decode_strict(await request.body(), KeyCreate)
        key, secret = await keys.create_with(body.settings())
        return created(key, secret)

    @get("/{key_id:str}")
    async def get_key(self, key_id: FromPath[str], keys: NamedDependency[ApiKeyService]) -> KeyOut:
        key = await keys.get(key_id)
        return describe(key, (await keys.window_usage([key.id])).get(key.id))

    @delete("/{key_id:str}", status_code=HTTP_200_OK)
    async def revoke_key(self, key_id: FromPath[str], keys: NamedDependency[ApiKeyService]) -> KeyOut:
        """Revoke: refused at once by every process; its admin panel sessions end."""
        return describe(await keys.revoke(key_id))

    @post("/{key_id:str}/rotate", status_code=HTTP_201_CREATED)
    async def rotate_key(self, key_id: FromPath[str], keys: NamedDependency[ApiKeyService]) -> KeyCreated:
        """A new secret with the same settings and usage; the old key is revoked."""
        key, secret = await keys.rotate(key_id)
        return created(key, secret)
