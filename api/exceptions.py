"""Errors to HTTP, once, at the edge: every error leaves in the OpenAI shape
``{"error": {"message", "type", "param", "code"}}``; /v1 errors carry the x-moerge-* routing headers too.

Besides moerge's own errors (``core.errors``: each carries its status), two kinds of failure that are not bugs
get their meaning here rather than a 500: a full disk (``OSError`` ENOSPC / EDQUOT from whatever wrote) is a
507 naming what could not be written, and a database that cannot be reached or written (what
``registry.db.database_error`` says of an SQLAlchemy error the engine's listeners did not already translate,
such as a pool timeout) a 503 with ``Retry-After`` or a 507.

Messages to a caller without the admin scope carry no path on this machine (see ``redact_local_paths``)."""

from __future__ import annotations

import functools
import logging
import os
import re
import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from litestar import Request, Response
from litestar.exceptions import HTTPException, ValidationException
from litestar.status_codes import HTTP_500_INTERNAL_SERVER_ERROR
from sqlalchemy.exc import SQLAlchemyError

from api.openai.protocol import ErrorDetail, ErrorResponse
from core.errors import InsufficientStorage, MoergeError, is_out_of_space
from registry.db import database_error

log = logging.getLogger("moerge.api")

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "conflict_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    503: "server_error",
    507: "server_error",
}


def error_body(message: str, *, type_: str, param: str | None, code: str | None) -> ErrorResponse:
    return ErrorResponse(error=ErrorDetail(message=message, type=type_, param=param, code=code))


# A path ends at whitespace, a quote or a bracket; it starts at one of the roots, not inside a longer name.
_PATH_TAIL = r"(?![A-Za-z0-9_.-])[^\s'\"`,;()\[\]{}<>]*"
REDACTED = "<path>"


@functools.lru_cache(maxsize=16)
def _roots_pattern(roots: tuple[str, ...]) -> re.Pattern[str] | None:
    usable = sorted({r.rstrip("/") for r in roots if len(r.rstrip("/")) > 1}, key=len, reverse=True)
    if not usable:
        return None
    return re.compile("|".join(re.escape(r) + _PATH_TAIL for r in usable))


def redact_local_paths(message: str, roots: Iterable[str | Path]) -> str:
    """``message`` with every path under one of ``roots`` replaced by ``<path>``. A backstop: the engines
    already keep paths and log lines out of their errors (they log them), but an exception's own text
    (transformers, PEFT, the OS) can name a model folder, the store or a cache."""
    pattern = _roots_pattern(tuple(sorted({str(r) for r in roots})))
    return pattern.sub(REDACTED, message) if pattern is not None else message


def local_roots(request: Request[Any, Any, Any]) -> list[str]:
    """Folders whose paths callers never see: moerge's home (store, logs, converted models), the import roots,
    the temp folder, the Python environment, the code and the user's home."""
    roots: list[Path] = [Path(tempfile.gettempdir()), Path(sys.prefix), Path(__file__).resolve().parents[1]]
    runtime = getattr(request.app.state, "runtime", None)
    if runtime is not None:
        roots += [runtime.settings.home, *runtime.settings.import_roots]
    roots.append(Path(os.path.expanduser("~")))  # never raises, unlike Path.home() without HOME
    return [str(p) for root in roots for p in (root, root.resolve())]


def for_caller(request: Request[Any, Any, Any], message: str) -> str:
    """An error message as this caller may read it: whole for an admin key, without local paths otherwise."""
    if "admin" in (getattr(request.state, "api_key_scopes", None) or ()):
        return message
    return redact_local_paths(message, local_roots(request))


def _extra_headers(request: Request[Any, Any, Any], exc: Exception) -> dict[str, str]:
    """Routing headers on /v1 errors too, and Retry-After when the engine is coming back."""
    headers: dict[str, str] = {}
    if request.url.path.startswith(("/v1/", "/api/route")):
        from api.openai.serving import routing_headers

        failed = getattr(exc, "failed", ())  # every member of a composition failed: name them
        headers.update(routing_headers(getattr(request.state, "moerge_route", None), failed=tuple(failed)))
    if (retry := getattr(exc, "retry_after", None)) is not None:
        headers["retry-after"] = str(int(retry))
    return headers


def moerge_error_handler(request: Request[Any, Any, Any], exc: MoergeError) -> Response[ErrorResponse]:
    return Response(
        error_body(for_caller(request, exc.message), type_=exc.error_type, param=exc.param, code=exc.code),
        status_code=exc.status_code,
        headers=_extra_headers(request, exc),
    )


def http_error_handler(request: Request[Any, Any, Any], exc: HTTPException) -> Response[ErrorResponse]:
    param = None
    message = exc.detail
    if isinstance(exc, ValidationException) and isinstance(exc.extra, list) and exc.extra:
        first = exc.extra[0]
        if isinstance(first, dict):
            param = first.get("key") or None
            message = f"{exc.detail}: {first.get('message', '')}".rstrip(": ")
    return Response(
        error_body(
            for_caller(request, message),
            type_=_TYPES.get(exc.status_code, "server_error"),
            param=param,
            code=str(exc.status_code),
        ),
        status_code=exc.status_code,
        headers={**(exc.headers or {}), **_extra_headers(request, exc)},
    )


def internal_error_handler(request: Request[Any, Any, Any], exc: Exception) -> Response[ErrorResponse]:
    log.exception("unhandled error", exc_info=exc)
    return Response(
        error_body(f"internal error: {type(exc).__name__}", type_="server_error", param=None, code="internal_error"),
        status_code=HTTP_500_INTERNAL_SERVER_ERROR,
        headers=_extra_headers(request, exc),
    )


def os_error_handler(request: Request[Any, Any, Any], exc: OSError) -> Response[ErrorResponse]:
    """A full disk is a 507 saying what could not be written (the file, for an admin); any other OS error is a
    bug or a broken machine: 500."""
    if not is_out_of_space(exc):
        return internal_error_handler(request, exc)
    log.warning("%s %s: out of disk space: %s", request.method, request.url.path, exc)
    where = f" writing {exc.filename}" if exc.filename else ""
    full = InsufficientStorage(
        f"{request.method} {request.url.path} failed: the server's disk is full ({exc.strerror}{where}); "
        "nothing was saved: free space and try again"
    )
    return moerge_error_handler(request, full)


def database_error_handler(request: Request[Any, Any, Any], exc: SQLAlchemyError) -> Response[ErrorResponse]:
    """A database that cannot be reached or written now: 503 (``Retry-After``) or 507; anything else is a bug."""
    meaning = database_error(exc)
    if meaning is None:
        return internal_error_handler(request, exc)
    log.warning("%s %s: %s (%s)", request.method, request.url.path, meaning.message, type(exc).__name__)
    return moerge_error_handler(request, meaning)


exception_handlers: dict[Any, Any] = {
    MoergeError: moerge_error_handler,
    HTTPException: http_error_handler,
    OSError: os_error_handler,
    SQLAlchemyError: database_error_handler,
    Exception: internal_error_handler,
}
