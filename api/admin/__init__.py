"""The admin panel at /admin: server-rendered Jinja2 pages enhanced by HTMX, on the JSON API's services
and key check. ``admin_router`` mounts it; ``admin_app_config`` gives the app its templates and HTMX plugin."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from litestar import Router
from litestar.config.csrf import CSRFConfig
from litestar.exceptions import HTTPException, NotAuthorizedException
from litestar.middleware import DefineMiddleware
from litestar.middleware.csrf import CSRFMiddleware
from litestar.middleware.session import SessionMiddleware
from litestar.middleware.session.client_side import ClientSideSessionBackend, CookieBackendConfig
from litestar.plugins.htmx import HTMXPlugin, HTMXRequest
from litestar.plugins.jinja import JinjaTemplateEngine
from litestar.static_files import create_static_files_router
from litestar.template.config import TemplateConfig
from litestar.types import ASGIApp

from api.admin.auth import PUBLIC, AuthController, error_page, require_admin_session, signed_out_response
from api.admin.compositions import CompositionPages
from api.admin.dashboard import DashboardPage
from api.admin.evals import EvalPage
from api.admin.experts import ExpertPages
from api.admin.merges import MergePages
from api.admin.playground import PlaygroundPage
from api.settings import Settings
from registry.errors import MoergeError

HERE = Path(__file__).parent
CSRF_FIELD = "_csrf_token"  # the form field Litestar's CSRF middleware reads


def _template_engine(engine: JinjaTemplateEngine) -> None:
    engine.engine.globals["csrf_field"] = CSRF_FIELD


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
        ],
        guards=[require_admin_session],
        request_class=HTMXRequest,  # handlers read `request.htmx` (the app's plugin sets it too)
        middleware=[
            DefineMiddleware(
                _session_middleware, secret=settings.session_key("session"), secure=settings.admin_cookie_secure
            ),
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
