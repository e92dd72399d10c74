"""API keys: the list (status, limits, usage so far), a create form with every option, revoke and rotate.
A new secret (created or rotated) is shown once, on the page that answers the form; it is never stored."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from litestar import Controller, Request, get, post
from litestar.di import NamedDependency
from litestar.params import FromQuery
from litestar.response import Template

from api.admin.views import PAGE_SIZE, FormErrors, Pager, split_slugs
from api.keys.schemas import describe
from api.schemas import PageOffset
from core.errors import MoergeError, ValidationFailed
from registry.keys import MAX_LIMIT, SCOPES, ApiKeyService, KeySettings

FIELDS = ("name", "models", "rpm_limit", "tpm_limit", "token_budget", "duration", "expires_at")
FIELD_OF = {n: n for n in FIELDS} | {"scopes": "scopes"}


def _number(form: Any, name: str) -> int | None:
    text = str(form.get(name) or "").strip()
    if not text:
        return None
    # ASCII digits only: "²".isdigit() holds but int() refuses it
    if not (text.isascii() and text.isdigit()):
        raise ValidationFailed(f"{name} must be a whole number", param=name)
    digits = text.lstrip("0") or "0"
    if len(digits) > len(str(MAX_LIMIT)):  # and int() refuses more than 4300 digits
        raise ValidationFailed(f"{name} must be between 1 and {MAX_LIMIT} (leave it empty for no limit)", param=name)
    return int(digits)


def _settings(form: Any) -> KeySettings:
    """The form as the settings of a key (the same checks as the API)."""
    expires_text = str(form.get("expires_at") or "").strip()
    try:
        expires_at = datetime.fromisoformat(expires_text) if expires_text else None
    except ValueError:
        raise ValidationFailed(
            "expires_at must be a date and time, e.g. 2030-01-31T12:00", param="expires_at"
        ) from None
    models_text = str(form.get("models") or "")
    return KeySettings.checked(
        str(form.get("name") or ""),
        [str(s) for s in form.getall("scopes", [])],
        models=split_slugs(models_text) if models_text.strip() else None,
        rpm_limit=_number(form, "rpm_limit"),
        tpm_limit=_number(form, "tpm_limit"),
        token_budget=_number(form, "token_budget"),
        expires_at=expires_at,
        duration=str(form.get("duration") or "").strip() or None,
    )


class KeyPages(Controller):
    path = "/admin/keys"

    async def _page(
        self,
        keys: ApiKeyService,
        *,
        offset: int = 0,
        include_revoked: bool = False,
        values: dict[str, Any] | None = None,
        errors: FormErrors | None = None,
        secret: dict[str, str] | None = None,
        notice: str | None = None,
        code: int = 200,
    ) -> Template:
        page = await keys.list_keys(limit=PAGE_SIZE, offset=max(0, offset), include_revoked=include_revoked)
        minutes = await keys.window_usage([k.id for k in page.items])
        return Template(
            "keys.html",
            context={
                "keys": [describe(k, minutes.get(k.id)) for k in page.items],
                "pager": Pager(page.total, page.offset, PAGE_SIZE, {"revoked": "1" if include_revoked else ""}),
                "include_revoked": include_revoked,
                "scopes": SCOPES,
                "values": values or {"scopes": ["query"]},
                "errors": errors or FormErrors(),
                "secret": secret,
                "notice": notice,
            },
            status_code=code,
            # cached nowhere: neither a new secret nor a stale list (Back would show a rotated key still active)
            headers={"Cache-Control": "no-store"},
        )

    @get("/")
    async def list_page(
        self, keys: NamedDependency[ApiKeyService], offset: PageOffset = 0, revoked: FromQuery[str] = ""
    ) -> Template:
        return await self._page(keys, offset=offset, include_revoked=bool(revoked))

    @post("/")
    async def create(self, request: Request[Any, Any, Any], keys: NamedDependency[ApiKeyService]) -> Template:
        form = await request.form()
        values: dict[str, Any] = {name: str(form.get(name) or "") for name in FIELDS}
        values["scopes"] = [str(s) for s in form.getall("scopes", [])]
        try:
            key, secret = await keys.create_with(_settings(form))
        except MoergeError as exc:
            return await self._page(keys, values=values, errors=FormErrors.of(exc, FIELD_OF), code=exc.status_code)
        return await self._page(keys, secret={"name": key.name, "prefix": key.prefix, "key": secret}, code=201)

    @post("/revoke")
    async def revoke(self, request: Request[Any, Any, Any], keys: NamedDependency[ApiKeyService]) -> Template:
        form = await request.form()
        ref = str(form.get("id") or "").strip()
        if not ref:
            raise ValidationFailed("which key? (id)", param="id")
        key = await keys.revoke(ref)
        return await self._page(keys, notice=f"revoked {key.name} ({key.prefix}…)")

    @post("/rotate")
    async def rotate(self, request: Request[Any, Any, Any], keys: NamedDependency[ApiKeyService]) -> Template:
        form = await request.form()
        ref = str(form.get("id") or "").strip()
        if not ref:
            raise ValidationFailed("which key? (id)", param="id")
        key, secret = await keys.rotate(ref)
        return await self._page(
            keys, secret={"name": key.name, "prefix": key.prefix, "key": secret}, notice="the old key is revoked"
        )
