"""Bodies of /api/keys: what a new key may set, and the typed shape of a key (never its secret or hash,
except the secret once, in the answer that created it)."""

from __future__ import annotations

from datetime import datetime

import msgspec

from registry.keys import KeySettings, as_utc, key_status
from registry.models import ApiKey


class KeyCreate(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """POST /api/keys. Limits follow LiteLLM's virtual keys: omitted means no limit."""

    name: str
    scopes: list[str] = msgspec.field(default_factory=lambda: ["query"])
    models: list[str] | None = None  # the model names this key may ask for (None: every model)
    rpm_limit: int | None = None  # requests per minute
    tpm_limit: int | None = None  # tokens (prompt + completion) per minute
    token_budget: int | None = None  # tokens in all, never renewed
    expires_at: datetime | None = None  # or
    duration: str | None = None  # e.g. "30d", "12h", "15m"

    def settings(self) -> KeySettings:
        return KeySettings.checked(
            self.name,
            self.scopes,
            models=self.models,
            rpm_limit=self.rpm_limit,
            tpm_limit=self.tpm_limit,
            token_budget=self.token_budget,
            expires_at=self.expires_at,
            duration=self.duration,
        )


class KeyUsage(msgspec.Struct, kw_only=True):
    """Usage so far; counted only for keys with a limit (``counted``), else the counts are null."""

    counted: bool
    requests: int | None
    tokens: int | None
    minute_requests: int | None  # in the current clock minute
    minute_tokens: int | None


class KeyOut(msgspec.Struct, kw_only=True):
    object: str = "api_key"
    id: str
    name: str
    prefix: str  # the secret's first characters, to tell keys apart
    scopes: list[str]
    status: str  # active, expired or revoked
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None
    last_used_at: datetime | None  # written at most once a minute per server process
    models: list[str] | None
    rpm_limit: int | None
    tpm_limit: int | None
    token_budget: int | None
    usage: KeyUsage
    rotated_from: str | None  # the id of the key this one replaced


class KeyCreated(KeyOut, kw_only=True):
    """A new key (created or rotated), with its secret: shown this once, stored only as a hash."""

    key: str


def describe(key: ApiKey, minute: tuple[int, int] | None = None) -> KeyOut:
    counted = key.rpm_limit is not None or key.tpm_limit is not None or key.token_budget is not None
    return KeyOut(
        id=str(key.id),
        name=key.name,
        prefix=key.prefix,
        scopes=[str(s) for s in key.scopes],
        status=key_status(key),
        created_at=as_utc(key.created_at) or key.created_at,
        expires_at=as_utc(key.expires_at),
        revoked_at=as_utc(key.revoked_at),
        last_used_at=as_utc(key.last_used_at),
        models=None if key.models is None else [str(m) for m in key.models],
        rpm_limit=key.rpm_limit,
        tpm_limit=key.tpm_limit,
        token_budget=key.token_budget,
        usage=KeyUsage(
            counted=counted,
            requests=int(key.requests_total) if counted else None,
            tokens=int(key.tokens_total) if counted else None,
            minute_requests=(minute or (0, 0))[0] if counted else None,
            minute_tokens=(minute or (0, 0))[1] if counted else None,
        ),
        rotated_from=str(key.rotated_from_id) if key.rotated_from_id else None,
    )


def created(key: ApiKey, secret: str) -> KeyCreated:
    return KeyCreated(**msgspec.structs.asdict(describe(key)), key=secret)
