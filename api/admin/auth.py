"""Admin sign-in: an admin API key, checked by the API's own key check, starts a server-side session (a row
of ``admin_sessions``); the signed, encrypted, http-only cookie holds only that session's random token. Every
other admin page and action needs a live session whose key is still valid with the admin scope. Signing out
ends the row, so a copied cookie stops working too; revoking the key ends all of its sessions."""

from __future__ import annotations

import logging
from typing import Any
from urllib.parse import quote

from litestar import Controller, Request, Response, get, post
from litestar.connection import ASGIConnection
from litestar.exceptions import HTTPException, NotAuthorizedException, PermissionDeniedException
from litestar.handlers.base import BaseRouteHandler
from litestar.params import FromQuery
from litestar.plugins.htmx import ClientRedirect, HTMXRequest, HTMXTemplate
from litestar.response import Redirect, Template
from litestar.status_codes import HTTP_303_SEE_OTHER

from api.deps import runtime_of
from api.security import authorize
from core.errors import Forbidden, MoergeError, Unauthorized
from registry.keys import AdminSessions, hash_key

log = logging.getLogger("moerge.admin")

SESSION_KEY = "sid"  # the cookie's one entry: the token of the admin_sessions row
PUBLIC = "admin_public"  # route opt: reachable without a session (sign-in, static files)


def _session(connection: ASGIConnection[Any, Any, Any, Any]) -> dict[str, Any]:
    return connection.session if "session" in connection.scope else {}


async def require_admin_session(connection: ASGIConnection[Any, Any, Any, Any], handler: BaseRouteHandler) -> None:
    """The admin panel's guard: the same key check and scope rule as the API's ``require_admin``."""
    if handler.opt.get(PUBLIC):
        return
    token = _session(connection).get(SESSION_KEY)
    if not token or not isinstance(token, str):
        raise NotAuthorizedException("sign in with an admin key")
    async with runtime_of(connection.app.state).sessionmaker() as db:
        sessions = AdminSessions(db)
        try:
            row, digest = await sessions.find(token)
            await authorize(connection, digest, "admin")
        except (Unauthorized, Forbidden) as exc:  # signed out, expired, or the key was revoked / lost its scope
            connection.clear_session()
            raise NotAuthorizedException(exc.message) from exc
        await sessions.touch(row)  # only a session that passed: a refused request writes nothing


def _htmx(request: Request[Any, Any, Any]) -> bool:
    """Whether HTMX sent the request (the app's request class is HTMXRequest: its plugin sets it)."""
    return isinstance(request, HTMXRequest) and bool(request.htmx)


def signed_out_response(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    """No (valid) session: to the sign-in page, coming back here afterwards. HTMX requests are told to
    load the page (a swapped-in sign-in form would be nonsense)."""
    query = f"?{request.url.query}" if request.url.query else ""
    target = f"{request.url.path}{query}" if request.method == "GET" else "/admin/"
    login = f"/admin/login?next={quote(target)}"
    if _htmx(request):
        redirect = ClientRedirect(login)
        redirect.status_code = 401  # HTMX follows HX-Redirect whatever the status; other clients see 401
        return redirect
    return Redirect(login, status_code=HTTP_303_SEE_OTHER)


def error_page(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    """Errors as HTML inside the panel; HTMX requests get just the message (swapped where asked)."""
    if isinstance(exc, MoergeError):
        status, message = exc.status_code, exc.message
    elif isinstance(exc, PermissionDeniedException):
        status, message = 403, f"{exc.detail}: reload the page and try again"
    elif isinstance(exc, HTTPException):
        status, message = exc.status_code, exc.detail
    else:
        log.exception("admin panel: unhandled error", exc_info=exc)
        status, message = 500, f"internal error: {type(exc).__name__}"
    if _htmx(request):  # 200: HTMX swaps only successful responses in
        return HTMXTemplate(template_name="fragments/error.html", context={"message": message}, status_code=200)
    return Template("error.html", context={"message": message, "status": status}, status_code=status)


def _safe_next(value: str | None) -> str:
    return value if value and value.startswith("/admin") and not value.startswith("//") else "/admin/"


class AuthController(Controller):
    path = "/admin"
    opt = {PUBLIC: True}

    @get("/login")
    async def login_form(self, request: Request[Any, Any, Any], next: FromQuery[str | None] = None) -> Template:
        return Template("login.html", context={"next": _safe_next(next), "error": None})

    @post("/login")
    async def login(self, request: Request[Any, Any, Any]) -> Response[Any]:
        form = await request.form()
        secret = str(form.get("key") or "").strip()
        target = _safe_next(str(form.get("next") or ""))
        try:
            grant = await authorize(request, hash_key(secret) if secret else None, "admin")
        except (Unauthorized, Forbidden) as exc:
            message = "this key has no admin scope" if isinstance(exc, Forbidden) else exc.message
            if not secret:
                message = "enter an admin API key"
            return Template("login.html", context={"next": target, "error": message}, status_code=401)
        async with runtime_of(request.app.state).sessionmaker() as db:
            token = await AdminSessions(db).start(grant.id)
        request.set_session({SESSION_KEY: token})  # a new token on every sign-in (no session fixation)
        return Redirect(target, status_code=HTTP_303_SEE_OTHER)

    @post("/logout")
    async def logout(self, request: Request[Any, Any, Any]) -> Response[Any]:
        token = _session(request).get(SESSION_KEY)
        if token and isinstance(token, str):
            async with runtime_of(request.app.state).sessionmaker() as db:
                await AdminSessions(db).end(token)  # the cookie, copied or not, is dead from now on
        request.clear_session()
        return Redirect("/admin/login", status_code=HTTP_303_SEE_OTHER)
