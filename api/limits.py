"""Request bodies bounded by route, before any byte of them is read.

Every route takes at most ``max_json_bytes`` (MOERGE_MAX_JSON_BYTES), the admin forms included. An upload
route (``opt=upload_opt(...)``) takes up to its own, larger limit, and only from an authenticated caller:
until the route's guard (:func:`admin_upload`) or the admin panel's gate (``api/admin``) has checked the
caller and called :func:`allow_upload`, the JSON limit holds, and those checks run before anything reads
the body, so an anonymous caller is refused before its first byte is taken in.

:class:`BodyLimitMiddleware` enforces the limit: a declared Content-Length over it is refused at once, a
chunked body is counted as it arrives and refused when it passes it, each with a 413 naming ``body``, the
limit and its setting. A response that leaves the request body unread (a refusal) closes the connection
(:func:`close_if_body_unread`), so the rest of the body is never taken in either. Litestar's own
``request_max_body_size`` stays as a backstop (the app's is ``max_json_bytes``; upload handlers set None
and are bounded here).

:func:`read_form` parses a form once, strictly: bytes that are not UTF-8 in a field are a 400 naming the
field (or ``body``), where Litestar would decode them as U+FFFD (url-encoded) or fail with a 500 (multipart).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote_to_bytes

from litestar import Request
from litestar.connection import ASGIConnection
from litestar.datastructures import FormMultiDict
from litestar.enums import RequestEncodingType
from litestar.exceptions import ClientException
from litestar.handlers.base import BaseRouteHandler
from litestar.types import ASGIApp, Message, Receive, ReceiveMessage, Scope, Send

from api.security import require_admin
from core.errors import PayloadTooLarge, ValidationFailed

__all__ = [
    "UPLOAD",
    "BodyLimitMiddleware",
    "admin_upload",
    "allow_upload",
    "close_if_body_unread",
    "read_form",
    "upload_opt",
]

UPLOAD = "moerge_upload"  # route opt: the route takes an authenticated upload (an UploadLimit)
_STATE = "moerge_body"  # the request's _Body, kept in scope["state"]
JSON_SETTING = "MOERGE_MAX_JSON_BYTES"
UPLOAD_SETTING = "MOERGE_MAX_UPLOAD_BYTES"


@dataclass(frozen=True)
class UploadLimit:
    cap: int | None  # at most this, and never more than max_upload_bytes; None: max_upload_bytes
    named: str  # the limit as the 413 names it


def upload_opt(cap: int | None = None, named: str = UPLOAD_SETTING) -> dict[str, Any]:
    """The ``opt`` of an upload route; its handler sets ``request_max_body_size=None`` (bounded here)."""
    return {UPLOAD: UploadLimit(cap, named)}


@dataclass
class _Body:
    limit: int
    named: str
    upload: tuple[int, str] | None  # what allow_upload raises the limit to, on an upload route
    declared: int | None  # Content-Length
    pending: bool  # a body was announced and has not been read to its end
    received: int = 0

    def too_large(self, limit: int, named: str) -> PayloadTooLarge:
        return PayloadTooLarge(
            f"the request body is larger than {limit} bytes, the limit of this route ({named})",
            param="body",
            code="request_too_large",
        )


def _header(scope: Scope, name: bytes) -> bytes | None:
    return next((value for key, value in scope.get("headers", []) if key.lower() == name), None)


def _declared_length(scope: Scope) -> int | None:
    raw = _header(scope, b"content-length")
    if raw is None:
        return None
    if not raw.strip().isdigit():
        raise ValidationFailed("Content-Length is not a number", param="content-length")
    return int(raw)


class BodyLimitMiddleware:
    """Next to the outermost (the drain, api/drain.py): every request body within its route's limit (see the module)."""

    def __init__(self, app: ASGIApp, *, max_json_bytes: int, max_upload_bytes: int) -> None:
        self.app = app
        self.max_json_bytes = max_json_bytes
        self.max_upload_bytes = max_upload_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        handler = scope.get("route_handler")
        upload: UploadLimit | None = handler.opt.get(UPLOAD) if handler is not None else None
        raised = None
        if upload is not None:
            cap = self.max_upload_bytes if upload.cap is None else min(upload.cap, self.max_upload_bytes)
            raised = (cap, upload.named)
        declared = _declared_length(scope)
        body = _Body(
            limit=self.max_json_bytes,
            named=JSON_SETTING,
            upload=raised,
            declared=declared,
            pending=bool(declared) or _header(scope, b"transfer-encoding") is not None,
        )
        scope.setdefault("state", {})[_STATE] = body
        ceiling = raised or (body.limit, body.named)
        if declared is not None and declared > ceiling[0]:
            raise body.too_large(*ceiling)  # before the first byte, whoever asks

        async def bounded_receive() -> ReceiveMessage:
            if body.declared is not None and body.declared > body.limit:  # an upload not (yet) allowed
                raise body.too_large(body.limit, body.named)
            message = await receive()
            if message["type"] == "http.request":
                body.received += len(message.get("body", b""))
                if body.received > body.limit:
                    raise body.too_large(body.limit, body.named)
                if not message.get("more_body", False):
                    body.pending = False
            elif message["type"] == "http.disconnect":
                body.pending = False
            return message

        await self.app(scope, bounded_receive, send)


def allow_upload(connection: ASGIConnection[Any, Any, Any, Any]) -> None:
    """The caller was checked: an upload route's body may now grow to the route's upload limit (other
    routes keep the JSON limit)."""
    body: _Body | None = connection.scope.get("state", {}).get(_STATE)
    if body is not None and body.upload is not None:
        body.limit, body.named = body.upload


async def admin_upload(connection: ASGIConnection[Any, Any, Any, Any], handler: BaseRouteHandler) -> None:
    """Guard of the API's upload routes: an admin key first; only then may the body pass the JSON limit."""
    await require_admin(connection, handler)
    allow_upload(connection)


async def close_if_body_unread(message: Message, scope: Scope) -> None:
    """App ``before_send`` hook: a response that starts while the request body is still unread (a refusal)
    closes the connection, so the server takes in none of the rest."""
    if message["type"] == "http.response.start":
        body: _Body | None = scope.get("state", {}).get(_STATE)
        if body is not None and body.pending:
            message["headers"] = [*message.get("headers", []), (b"connection", b"close")]


def _check_urlencoded(raw: bytes) -> None:
    """Each name and value of a url-encoded form, percent-decoded, must be UTF-8 (Litestar would turn bad
    bytes into U+FFFD without a word)."""
    for pair in raw.split(b"&"):
        name, _, value = pair.partition(b"=")
        decoded_name = unquote_to_bytes(name.replace(b"+", b" "))
        try:
            field = decoded_name.decode("utf-8")
        except UnicodeDecodeError:
            raise ValidationFailed(
                "a form field's name is not valid UTF-8", param="body", code="invalid_encoding"
            ) from None
        try:
            unquote_to_bytes(value.replace(b"+", b" ")).decode("utf-8")
        except UnicodeDecodeError:
            raise ValidationFailed(
                f"form field {field!r} is not valid UTF-8", param=field or "body", code="invalid_encoding"
            ) from None


async def read_form(request: Request[Any, Any, Any]) -> FormMultiDict:
    """The request's form, parsed once (the CSRF check and the handler get the same one), strictly."""
    content_type = request.content_type[0]
    if content_type == RequestEncodingType.URL_ENCODED:
        _check_urlencoded(await request.body())
    try:
        return await request.form()
    except UnicodeDecodeError as exc:  # a multipart text field (Litestar decodes it strictly, uncaught)
        raise ValidationFailed(
            f"a form field is not valid UTF-8 ({exc.reason})", param="body", code="invalid_encoding"
        ) from None
    except ClientException as exc:
        if exc.status_code != 400:  # e.g. Litestar's own 413
            raise
        # malformed multipart, including part names and file names that are not UTF-8
        raise ValidationFailed(f"the form cannot be read: {exc.detail}", param="body") from None
