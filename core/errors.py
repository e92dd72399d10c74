"""One exception hierarchy for the whole of moerge.

Services raise these; the API maps them to HTTP once (``api/exceptions.py``) and the CLI
turns them into a message and a non-zero exit. Each carries the field it is about, so a
client is told which part of its input was wrong and why. It lives in ``core`` (below every
other package) so that every layer raises the same errors without importing the registry.
"""

from __future__ import annotations

import errno

__all__ = [
    "Conflict",
    "DatabaseNotReady",
    "DatabaseUnavailable",
    "Forbidden",
    "InsufficientStorage",
    "MoergeError",
    "NotFound",
    "PayloadTooLarge",
    "RateLimited",
    "Unauthorized",
    "Unprocessable",
    "ValidationFailed",
    "is_out_of_space",
]


class MoergeError(Exception):
    """Base of every error moerge raises on purpose."""

    status_code = 500
    error_type = "server_error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code or self.default_code

    default_code = "internal_error"


class ValidationFailed(MoergeError):
    """The input is malformed or does not fit: names the field and the reason."""

    status_code = 400
    error_type = "invalid_request_error"
    default_code = "invalid_value"


class PayloadTooLarge(ValidationFailed):
    status_code = 413
    default_code = "payload_too_large"


class NotFound(MoergeError):
    status_code = 404
    error_type = "not_found_error"
    default_code = "not_found"


class Conflict(MoergeError):
    """The request clashes with existing state (duplicate slug, an expert still in use)."""

    status_code = 409
    error_type = "conflict_error"
    default_code = "conflict"


class Unprocessable(MoergeError):
    """A well-formed request the current state cannot serve (e.g. no expert fits and no fallback is set)."""

    status_code = 422
    error_type = "invalid_request_error"
    default_code = "unprocessable"


class Unauthorized(MoergeError):
    status_code = 401
    error_type = "authentication_error"
    default_code = "invalid_api_key"


class Forbidden(MoergeError):
    status_code = 403
    error_type = "permission_error"
    default_code = "forbidden"


class RateLimited(MoergeError):
    """A key's limit is spent: requests or tokens this minute (``retry_after``: seconds until the window
    frees), or its token budget (no ``retry_after``: waiting does not help)."""

    status_code = 429
    error_type = "rate_limit_error"
    default_code = "rate_limit_exceeded"

    def __init__(
        self, message: str, *, param: str | None = None, code: str | None = None, retry_after: int | None = None
    ) -> None:
        super().__init__(message, param=param, code=code)
        self.retry_after = retry_after


class DatabaseNotReady(MoergeError):
    """The database is missing migrations: the app refuses to start on it."""

    status_code = 503
    error_type = "server_error"
    default_code = "database_not_migrated"


class DatabaseUnavailable(MoergeError):
    """The database cannot be reached now (refused, restarting, connection lost, no pooled connection free in
    time): worth retrying after ``retry_after`` seconds, unlike a bug."""

    status_code = 503
    error_type = "server_error"
    default_code = "database_unavailable"

    def __init__(
        self, message: str, *, param: str | None = "database", code: str | None = None, retry_after: int = 5
    ) -> None:
        super().__init__(message, param=param, code=code)
        self.retry_after = retry_after


class InsufficientStorage(MoergeError):
    """The disk that moerge writes to (the store, a merge's output, the database) is full: HTTP 507. Whatever
    was being written was removed again; freeing space and retrying the same request works."""

    status_code = 507
    error_type = "server_error"
    default_code = "insufficient_storage"


_OUT_OF_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT})


def is_out_of_space(exc: BaseException) -> bool:
    """Whether ``exc`` (or an error it was raised from) is the OS saying the disk or the user's quota is full."""
    current: BaseException | None = exc
    for _ in range(8):  # a short chain: ``raise ... from`` a few times at most
        if current is None:
            return False
        if isinstance(current, OSError) and current.errno in _OUT_OF_SPACE:
            return True
        current = current.__cause__
    return False
