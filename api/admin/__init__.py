"""The admin panel at /admin: server-rendered Jinja2 pages enhanced by HTMX, on the JSON API's services
and key check. ``admin_router`` mounts it; ``admin_app_config`` gives the app its templates and HTMX plugin."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from litestar import Router
from litestar.config.csrf import CSRFConfig
from litestar.connection import ASGIConnection
from litestar.exceptions import HTTPException, NotAuthorizedException
from litestar.middleware import DefineMiddleware
from litestar.middleware.csrf import CSRFMiddleware
from litestar.middleware.session import SessionMiddleware
from litestar.middleware.session.client_side import ClientSideSessionBackend, CookieBackendConfig
from litestar.plugins.htmx import HTMXPlugin, HTMXRequest
from litestar.plugins.jinja import JinjaTemplateEngine
from litestar.static_files import create_static_files_router
from litestar.template.config import TemplateConfig
from litestar.types import ASGIApp, Receive, Scope, Send

from api.admin.auth import PUBLIC, AuthController, error_page, require_admin_session, signed_out_response
from api.admin.compositions import CompositionPages
from api.admin.dashboard import DashboardPage
from api.admin.evals import EvalPage
from api.admin.experts import ExpertPages
from api.admin.keys import KeyPages
from api.admin.merges import MergePages
from api.admin.playground import PlaygroundPage
from api.limits import allow_upload, read_form
from api.schemas import struct_items
from core.errors import MoergeError
from core.settings import Settings

HERE = Path(__file__).parent
CSRF_FIELD = "_csrf_token"  # the form field Litestar's CSRF middleware reads


def _template_engine(engine: JinjaTemplateEngine) -> None:
    engine.engine.globals["csrf_field"] = CSRF_FIELD
    engine.engine.globals["fields"] = struct_items  # a typed answer's fields, for pages that list them all


def template_config() -> TemplateConfig[JinjaTemplateEngine]:
    return TemplateConfig(directory=HERE / "templates", engine=JinjaTemplateEngine, engine_callback=_template_engine)


def admin_plugins() -> list[Any]:
    return [HTMXPlugin()]


def _session_middleware(app: ASGIApp, secret: bytes, secure: bool) -> ASGIApp:
    """The session: encrypted (AES-GCM) and signed, http-only, SameSite=Lax, sent to /admin only (and over
    HTTPS only when ``secure``). Built per route stack (a router copies its middleware definitions, and the
    cipher cannot be copied)."""
    config = CookieBackendConfig(
        secret=secret, key="moerge_admin", path="/admin", httponly=True, samesite="lax", secure=secure
    )
    return SessionMiddleware(app=app, backend=ClientSideSessionBackend(config=config))


_CHECKED = "moerge_admin_checked"  # scope state: the gate below ran the session check for this request


class _Gate:
    """Between the session middleware and the CSRF middleware, which reads the whole form before any guard
    runs: the session is checked here first, so a request to a page behind it is refused before a byte of
    its body is read; the register form (an upload route) may then take more than the JSON limit
    (api/limits.py); and the form is parsed here, strictly (invalid UTF-8 is a 400, not a 500 from inside
    the CSRF check), then kept for the CSRF check and the handler. A refusal is answered here, through the
    panel's own error handlers and inside the session middleware, so a dead session's cookie is cleared."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        handler = scope["route_handler"]
        request = HTMXRequest(scope, receive, send)
        try:
            await require_admin_session(request, handler)
            if not handler.opt.get(PUBLIC):
                scope.setdefault("state", {})[_CHECKED] = True
                allow_upload(request)
            await read_form(request)  # only for form bodies; cached
        except Exception as exc:
            response = _handler_for(handler.resolve_exception_handlers(), exc)(request, exc)
            await response.to_asgi_response(app=None, request=request)(scope, receive, send)
            return
        await self.app(scope, receive, send)


def _handler_for(handlers: Mapping[Any, Any], exc: Exception) -> Any:
    return next(handlers[cls] for cls in type(exc).__mro__ if cls in handlers)  # Exception is always there


async def _session_checked(connection: ASGIConnection[Any, Any, Any, Any], handler: Any) -> None:
    """The router's guard: the gate has already checked this request's session (before reading its form);
    checked here again only if it did not run."""
    if not connection.scope.get("state", {}).get(_CHECKED):
        await require_admin_session(connection, handler)


def admin_router(settings: Settings) -> list[Any]:
    """The panel's routes: sign-in and pages behind the admin session, plus its static files."""
    csrf = CSRFConfig(
        secret=settings.session_key("csrf").hex(),
        cookie_name="moerge_csrf",
        cookie_path="/admin",
        cookie_httponly=True,  # the token reaches forms and HTMX headers from the page, not from JS cookies
        cookie_samesite="lax",
        cookie_secure=settings.admin_cookie_secure,
        header_name="x-csrftoken",
    )
    pages = Router(
        path="/",
        route_handlers=[
            AuthController,
            DashboardPage,
            ExpertPages,
            CompositionPages,
            PlaygroundPage,
            MergePages,
            EvalPage,
            KeyPages,
        ],
        guards=[_session_checked],
        request_class=HTMXRequest,  # handlers read `request.htmx` (the app's plugin sets it too)
        middleware=[
            DefineMiddleware(
                _session_middleware, secret=settings.session_key("session"), secure=settings.admin_cookie_secure
            ),
            DefineMiddleware(_Gate),
            DefineMiddleware(CSRFMiddleware, config=csrf),
        ],
        exception_handlers={
            NotAuthorizedException: signed_out_response,
            # every error, including the app-wide handlers' classes, as an HTML page inside the panel
            MoergeError: error_page,
            HTTPException: error_page,
            Exception: error_page,
        },
        include_in_schema=False,
    )
    static = create_static_files_router(
        path="/admin/static", directories=[HERE / "static"], opt={PUBLIC: True}, include_in_schema=False
    )
    return [pages, static]
