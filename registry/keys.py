"""API keys and their lifecycle: create (with expiry, a model allow-list and limits), list, revoke, rotate;
the usage counters that enforce the limits; the admin panel's sessions.

Counters live in the database so every process serving the same registry shares them:

- a key with a limit (``rpm_limit``, ``tpm_limit`` or ``token_budget``) is *metered*. Each request it makes
  runs one short transaction: an upsert of its row in ``key_usage`` for the current clock minute
  (``requests = requests + 1 ... RETURNING requests, tokens``) and ``requests_total + 1`` on the key's row
  (``RETURNING tokens_total``). Over a limit, the transaction rolls back (a refused request counts for
  nothing) and the caller gets 429. The tokens of an answer are added the same way once it is known.
- a key without limits pays no write per request: its grant is memoized for at most a second and
  ``last_used_at`` is written at most once a minute per process, off the request path. Its usage is not
  counted (give it a generous budget to count it).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import re
import secrets
import time
import uuid
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, cast

from sqlalchemy import Table, and_, func, or_, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from core.errors import Conflict, Forbidden, NotFound, RateLimited, Unauthorized, ValidationFailed
from registry.models import AdminSession, ApiKey, KeyUsage, utcnow

log = logging.getLogger("moerge.keys")

SCOPES = ("query", "admin", "fetch")  # fetch: read expert files (vLLM resolvers), nothing else
KEY_PREFIX = "mk-"
MAX_LIMIT = 10**15  # any larger limit is no limit; keeps every sum inside a 64-bit column
MAX_MODELS = 1000  # names in one key's allow-list
MAX_MODEL_NAME = 256
MAX_DURATION = timedelta(days=36500)
DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_DURATION = re.compile(r"^\s*(\d{1,12})\s*([smhdw])\s*$")

ADMIN_SESSION_IDLE = timedelta(hours=12)  # a panel session unused this long has ended
ADMIN_SESSION_MAX = timedelta(days=7)  # and any session after this long, however busy
SESSION_TOUCH = timedelta(minutes=1)  # last_seen_at (and the idle expiry) move at most this often

# Usage is written through the tables, not the ORM: an ORM flush of a key would bump the registry epoch
# (registry/epoch.py) and so drop every process's memos on each counted request.
KEYS = cast(Table, ApiKey.__table__)
USAGE = cast(Table, KeyUsage.__table__)
SESSIONS = cast(Table, AdminSession.__table__)


def hash_key(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def as_utc(value: datetime | None) -> datetime | None:
    """SQLite gives back naive datetimes (it drops the zone moerge wrote in UTC)."""
    if value is None:
        return None
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def check_scope(scopes: Sequence[str], need: str) -> None:
    if need not in scopes and "admin" not in scopes:
        raise Forbidden(f"this key lacks the {need!r} scope", param="authorization", code="insufficient_scope")


# -- what a request is allowed: the memoized view of a key ------------------------------------------------
@dataclass(frozen=True)
class KeyGrant:
    """What an authenticated request may do, as read from its key (memoized per process for a second)."""

    id: uuid.UUID
    scopes: tuple[str, ...]
    models: frozenset[str] | None = None  # None: every model
    rpm_limit: int | None = None
    tpm_limit: int | None = None
    token_budget: int | None = None
    expires_at: datetime | None = None

    @classmethod
    def of(cls, key: ApiKey) -> KeyGrant:
        return cls(
            id=key.id,
            scopes=tuple(str(s) for s in key.scopes),
            models=None if key.models is None else frozenset(str(m) for m in key.models),
            rpm_limit=key.rpm_limit,
            tpm_limit=key.tpm_limit,
            token_budget=key.token_budget,
            expires_at=as_utc(key.expires_at),
        )

    @property
    def metered(self) -> bool:
        """Whether requests are counted (only keys with a limit pay for counting)."""
        return self.rpm_limit is not None or self.tpm_limit is not None or self.token_budget is not None

    def check_live(self, now: datetime | None = None) -> None:
        if self.expires_at is not None and self.expires_at <= (now or utcnow()):
            raise expired(self.expires_at)

    def allows(self, model: str) -> bool:
        return self.models is None or model in self.models

    def check_model(self, model: str) -> None:
        if not self.allows(model):
            raise Forbidden(
                f"this API key may not use the model {model!r} (its allow-list names {len(self.models or ())})",
                param="model",
                code="model_not_allowed",
            )


def expired(at: datetime) -> Unauthorized:
    return Unauthorized(
        f"this API key expired at {at.isoformat(timespec='seconds')}", param="authorization", code="expired_api_key"
    )


# -- settings of a key: parsed and checked once for the API, the CLI and the panel --------------------------
@dataclass(frozen=True)
class KeySettings:
    """A key's settings (all but the secret), checked: each refusal names its field."""

    name: str
    scopes: tuple[str, ...]
    models: tuple[str, ...] | None = None
    rpm_limit: int | None = None
    tpm_limit: int | None = None
    token_budget: int | None = None
    expires_at: datetime | None = None

    @classmethod
    def checked(
        cls,
        name: str,
        scopes: Sequence[str],
        *,
        models: Sequence[str] | None = None,
        rpm_limit: int | None = None,
        tpm_limit: int | None = None,
        token_budget: int | None = None,
        expires_at: datetime | None = None,
        duration: str | None = None,
        now: datetime | None = None,
    ) -> KeySettings:
        now = now or utcnow()
        name = name.strip()
        if not name or len(name) > 128:
            raise ValidationFailed("name must be 1 to 128 characters", param="name")
        bad = [s for s in scopes if s not in SCOPES]
        if bad or not scopes:
            raise ValidationFailed(f"scopes must be a non-empty subset of {', '.join(SCOPES)}", param="scopes")
        limits = {"rpm_limit": rpm_limit, "tpm_limit": tpm_limit, "token_budget": token_budget}
        for field, value in limits.items():
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise ValidationFailed(f"{field} must be a whole number", param=field)
            if value is not None and not 1 <= value <= MAX_LIMIT:
                raise ValidationFailed(f"{field} must be between 1 and {MAX_LIMIT} (omit it for no limit)", param=field)
        if expires_at is not None and duration is not None:
            raise ValidationFailed("give expires_at or duration, not both", param="duration")
        if duration is not None:
            expires_at = now + parse_duration(duration)
        elif expires_at is not None:
            expires_at = as_utc(expires_at)
            assert expires_at is not None
            if expires_at <= now:
                raise ValidationFailed("expires_at must be in the future", param="expires_at")
            if expires_at - now > MAX_DURATION:
                raise ValidationFailed("expires_at must be within 100 years", param="expires_at")
        return cls(
            name=name,
            scopes=tuple(dict.fromkeys(scopes)),
            models=None if models is None else check_models(models),
            rpm_limit=rpm_limit,
            tpm_limit=tpm_limit,
            token_budget=token_budget,
            expires_at=expires_at,
        )

    def columns(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "scopes": list(self.scopes),
            "models": None if self.models is None else list(self.models),
            "rpm_limit": self.rpm_limit,
            "tpm_limit": self.tpm_limit,
            "token_budget": self.token_budget,
            "expires_at": self.expires_at,
        }


def parse_duration(text: str) -> timedelta:
    """``30d``, ``12h``, ``15m``, ``90s``, ``2w``: how long a new key lives."""
    found = _DURATION.match(text)
    if not found:
        raise ValidationFailed(
            "duration must be a number and a unit: s, m, h, d or w (e.g. 30d, 12h)", param="duration"
        )
    seconds = int(found.group(1)) * DURATION_UNITS[found.group(2)]
    if seconds <= 0 or seconds > MAX_DURATION.total_seconds():
        raise ValidationFailed("duration must be more than 0 and at most 36500d", param="duration")
    return timedelta(seconds=seconds)


def check_models(models: Sequence[str]) -> tuple[str, ...]:
    if isinstance(models, str):
        raise ValidationFailed("models must be a list of model names", param="models")
    names = [m.strip() if isinstance(m, str) else m for m in models]
    if not names:
        raise ValidationFailed("models must name at least one model (omit it to allow every model)", param="models")
    if len(names) > MAX_MODELS:
        raise ValidationFailed(f"models may name at most {MAX_MODELS} models", param="models")
    for i, name in enumerate(names):
        if not isinstance(name, str) or not name or len(name) > MAX_MODEL_NAME:
            raise ValidationFailed(f"each model name must be 1 to {MAX_MODEL_NAME} characters", param=f"models[{i}]")
    return tuple(dict.fromkeys(names))


def key_status(key: ApiKey, now: datetime | None = None) -> str:
    if key.revoked:
        return "revoked"
    expires = as_utc(key.expires_at)
    if expires is not None and expires <= (now or utcnow()):
        return "expired"
    return "active"


@dataclass
class KeyPage:
    items: list[ApiKey]
    total: int
    limit: int
    offset: int


class ApiKeyService:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def create(
        self,
        name: str,
        scopes: Sequence[str],
        *,
        secret: str | None = None,
        models: Sequence[str] | None = None,
        rpm_limit: int | None = None,
        tpm_limit: int | None = None,
        token_budget: int | None = None,
        expires_at: datetime | None = None,
        duration: str | None = None,
    ) -> tuple[ApiKey, str]:
        """Create a key; the secret is returned once and only its hash is stored."""
        settings = KeySettings.checked(
            name,
            scopes,
            models=models,
            rpm_limit=rpm_limit,
            tpm_limit=tpm_limit,
            token_budget=token_budget,
            expires_at=expires_at,
            duration=duration,
        )
        return await self.create_with(settings, secret=secret)

    async def create_with(self, settings: KeySettings, *, secret: str | None = None) -> tuple[ApiKey, str]:
        secret = secret or KEY_PREFIX + secrets.token_urlsafe(32)
        if len(secret) < 16:
            raise ValidationFailed("an API key must be at least 16 characters", param="key")
        key = ApiKey(prefix=secret[:10], key_hash=hash_key(secret), **settings.columns())
        self.session.add(key)
        try:
            await self.session.commit()
        except IntegrityError as exc:
            await self.session.rollback()
            raise Conflict("that key already exists", param="key") from exc
        return key, secret

    async def create_first_admin(self, secret: str | None = None) -> str | None:
        """The first admin key, when there is no key yet; returns its secret (to show once) or None."""
        if await self.count():
            return None
        _, created = await self.create("admin", ["admin", "query"], secret=secret)
        return created

    async def count(self) -> int:
        return int(await self.session.scalar(select(func.count()).select_from(ApiKey)) or 0)

    async def authenticate(self, secret: str | None, *, need: str) -> ApiKey:
        return await self.authenticate_digest(hash_key(secret) if secret else None, need=need)

    async def authenticate_digest(self, digest: str | None, *, need: str) -> ApiKey:
        """Like :meth:`authenticate`, from the key's hash."""
        if not digest:
            raise Unauthorized("missing API key: send `Authorization: Bearer <key>`", param="authorization")
        key = await self.session.scalar(select(ApiKey).where(ApiKey.key_hash == digest))
        if key is None:
            raise Unauthorized("invalid API key", param="authorization")
        if key.revoked:
            raise Unauthorized("this API key was revoked", param="authorization", code="revoked_api_key")
        KeyGrant.of(key).check_live()
        check_scope(key.scopes, need)
        return key

    async def list_keys(self, *, limit: int = 50, offset: int = 0, include_revoked: bool = True) -> KeyPage:
        limit, offset = max(1, min(limit, 500)), max(0, offset)
        where = [] if include_revoked else [ApiKey.revoked.is_(False)]
        total = int(await self.session.scalar(select(func.count()).select_from(ApiKey).where(*where)) or 0)
        query = select(ApiKey).where(*where).order_by(ApiKey.created_at.desc(), ApiKey.id).limit(limit).offset(offset)
        return KeyPage(list(await self.session.scalars(query)), total, limit, offset)

    async def get(self, ref: str) -> ApiKey:
        """A key by its id, or by its prefix (what lists show) when that names one key."""
        try:
            return await self._by_id(uuid.UUID(ref))
        except ValueError:
            pass
        found = list(await self.session.scalars(select(ApiKey).where(ApiKey.prefix == ref).limit(2)))
        if len(found) > 1:
            raise Conflict(f"the prefix {ref!r} names several keys: give the key's id", param="id")
        if not found:
            raise NotFound(f"no API key {ref!r}", param="id", code="key_not_found")
        return found[0]

    async def _by_id(self, key_id: uuid.UUID) -> ApiKey:
        key = await self.session.get(ApiKey, key_id)
        if key is None:
            raise NotFound(f"no API key {key_id}", param="id", code="key_not_found")
        return key

    async def revoke(self, ref: str) -> ApiKey:
        """Revoke a key (again: no change) and end its admin panel sessions. The last active admin key is
        kept: without it nobody could manage keys through the API (create another first, or rotate it)."""
        key = await self.get(ref)
        if key.revoked:
            return key
        await self._keep_an_admin(key)
        await self._retire(key)
        await self.session.commit()
        return key

    async def rotate(self, ref: str) -> tuple[ApiKey, str]:
        """A new secret with the same settings and usage so far; the old key is revoked in the same
        transaction (its sessions end). Returns the new key and its secret (shown once)."""
        old = await self.get(ref)
        if key_status(old) != "active":
            raise Conflict(f"this key is {key_status(old)}: create a new key instead", param="id", code="key_inactive")
        secret = KEY_PREFIX + secrets.token_urlsafe(32)
        new = ApiKey(
            name=old.name,
            prefix=secret[:10],
            key_hash=hash_key(secret),
            scopes=list(old.scopes),
            models=None if old.models is None else list(old.models),
            rpm_limit=old.rpm_limit,
            tpm_limit=old.tpm_limit,
            token_budget=old.token_budget,
            expires_at=old.expires_at,
            requests_total=old.requests_total,  # a rotation changes the secret, not what was spent
            tokens_total=old.tokens_total,
            rotated_from_id=old.id,
        )
        self.session.add(new)
        await self._retire(old)
        await self.session.commit()
        return new, secret

    async def _retire(self, key: ApiKey) -> None:
        now = utcnow()
        key.revoked, key.revoked_at = True, now  # the ORM flush bumps the registry epoch: memos drop the key
        await self.session.execute(
            update(AdminSession)
            .where(AdminSession.key_id == key.id, AdminSession.ended_at.is_(None))
            .values(ended_at=now)
            .execution_options(synchronize_session=False)
        )

    async def _keep_an_admin(self, key: ApiKey) -> None:
        if "admin" not in key.scopes:
            return
        rows = await self.session.execute(
            select(ApiKey.id, ApiKey.scopes, ApiKey.expires_at).where(ApiKey.revoked.is_(False), ApiKey.id != key.id)
        )
        now = utcnow()
        for _, scopes, expires_at in rows:
            expires = as_utc(expires_at)
            if "admin" in (scopes or []) and (expires is None or expires > now):
                return
        raise Conflict(
            "this is the last active admin key: create another admin key first (or rotate this one)",
            param="id",
            code="last_admin_key",
        )

    async def window_usage(self, key_ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, tuple[int, int]]:
        """Requests and tokens of each key in the current minute (metered keys only have rows)."""
        if not key_ids:
            return {}
        rows = await self.session.execute(
            select(KeyUsage.key_id, KeyUsage.requests, KeyUsage.tokens).where(
                KeyUsage.key_id.in_(list(key_ids)), KeyUsage.minute == current_minute()
            )
        )
        return {key_id: (int(r), int(t)) for key_id, r, t in rows}


# -- usage counters (shared through the database) ---------------------------------------------------------
def current_minute(now: float | None = None) -> int:
    return int((time.time() if now is None else now) // 60)


def seconds_left_in_minute(now: float | None = None) -> int:
    """Retry-After for a per-minute limit: whole seconds until the next clock minute (at least 1)."""
    t = time.time() if now is None else now
    return max(1, math.ceil(60 - t % 60))


def refusal(grant: KeyGrant, requests: int, tokens: int, tokens_total: int, now: float) -> RateLimited | None:
    """The limit a request would break (``requests`` already counts it), or None."""
    if grant.rpm_limit is not None and requests > grant.rpm_limit:
        wait = seconds_left_in_minute(now)
        return RateLimited(
            f"this API key's limit of {grant.rpm_limit} requests per minute is reached: retry in {wait} s",
            param="rpm_limit",
            code="rpm_limit_exceeded",
            retry_after=wait,
        )
    if grant.tpm_limit is not None and tokens >= grant.tpm_limit:
        wait = seconds_left_in_minute(now)
        return RateLimited(
            f"this API key's limit of {grant.tpm_limit} tokens per minute is reached ({tokens} used this "
            f"minute): retry in {wait} s",
            param="tpm_limit",
            code="tpm_limit_exceeded",
            retry_after=wait,
        )
    if grant.token_budget is not None and tokens_total >= grant.token_budget:
        return RateLimited(
            f"this API key's token budget of {grant.token_budget} tokens is exhausted ({tokens_total} used); "
            "it does not renew: waiting will not help, ask an admin for a key with a new budget",
            param="token_budget",
            code="budget_exceeded",
        )
    return None


class UsageMeter:
    """Counts what metered keys use, in the database, so that every process shares one count; writes
    ``last_used_at`` of the other keys at most once a minute per process, off the request path."""

    TOUCH_EVERY_S = 60.0
    SWEEP_EVERY_S = 60.0

    def __init__(self, sessionmaker: async_sessionmaker[AsyncSession]) -> None:
        self.sessionmaker = sessionmaker
        self._touched: dict[uuid.UUID, float] = {}
        self._swept = 0.0
        self._tasks: set[asyncio.Task[None]] = set()

    def _upsert(self, session: AsyncSession, key_id: uuid.UUID, minute: int, requests: int, tokens: int) -> Any:
        dialect = session.get_bind().dialect.name
        insert = pg_insert if dialect == "postgresql" else sqlite_insert
        table = USAGE
        return (
            insert(table)
            .values(key_id=key_id, minute=minute, requests=requests, tokens=tokens)
            .on_conflict_do_update(
                index_elements=[table.c.key_id, table.c.minute],
                set_={"requests": table.c.requests + requests, "tokens": table.c.tokens + tokens},
            )
            .returning(table.c.requests, table.c.tokens)
        )

    async def admit(self, grant: KeyGrant) -> None:
        """Count one request of a metered key, or refuse it (429, nothing counted) if it breaks a limit."""
        now = time.time()
        keys = KEYS
        async with self.sessionmaker() as session, session.begin():
            # the write comes first: on SQLite the transaction takes the write lock at once (no upgrade race)
            requests, tokens = (await session.execute(self._upsert(session, grant.id, current_minute(now), 1, 0))).one()
            total = await session.scalar(
                update(keys)
                .where(keys.c.id == grant.id)
                .values(requests_total=keys.c.requests_total + 1, last_used_at=utcnow())
                .returning(keys.c.tokens_total)
            )
            if total is None:
                raise Unauthorized("invalid API key", param="authorization")
            refused = refusal(grant, int(requests), int(tokens), int(total), now)
            if refused is not None:
                raise refused  # leaving the block rolls the counts back
        self._maybe_sweep(now)

    async def charge(self, grant: KeyGrant, tokens: int) -> None:
        """Add an answer's tokens (prompt + completion) to a metered key's minute and total."""
        if not grant.metered or tokens <= 0:
            return
        keys = KEYS
        async with self.sessionmaker() as session, session.begin():
            await session.execute(self._upsert(session, grant.id, current_minute(), 0, tokens))
            await session.execute(
                update(keys).where(keys.c.id == grant.id).values(tokens_total=keys.c.tokens_total + tokens)
            )

    def charge_later(self, grant: KeyGrant, tokens: int) -> None:
        """:meth:`charge` in the background (a stream the client left: its request is being cancelled)."""
        if grant.metered and tokens > 0:
            self._spawn(self.charge(grant, tokens))

    def seen(self, grant: KeyGrant) -> None:
        """An unmetered key was used: note ``last_used_at`` if this process has not in the last minute."""
        now = time.monotonic()
        if now - self._touched.get(grant.id, -math.inf) < self.TOUCH_EVERY_S:
            return
        if len(self._touched) > 10_000:
            self._touched.clear()
        self._touched[grant.id] = now
        self._spawn(self._touch(grant.id))

    async def _touch(self, key_id: uuid.UUID) -> None:
        keys = KEYS
        async with self.sessionmaker() as session, session.begin():
            await session.execute(update(keys).where(keys.c.id == key_id).values(last_used_at=utcnow()))

    def _maybe_sweep(self, now: float) -> None:
        if now - self._swept >= self.SWEEP_EVERY_S:
            self._swept = now
            self._spawn(self._sweep(current_minute(now)))

    async def _sweep(self, minute: int) -> None:
        """Drop the minutes that can no longer matter (the current and the previous one are kept)."""
        async with self.sessionmaker() as session, session.begin():
            await session.execute(USAGE.delete().where(USAGE.c.minute < minute - 1))

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("key usage write failed: %r", task.exception())

    async def drain(self) -> None:
        """Wait for the background writes (at shutdown)."""
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=10)


# -- admin panel sessions ----------------------------------------------------------------------------------
class AdminSessions:
    """The admin panel's server-side sessions: the cookie holds a random token, the database its hash."""

    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def start(self, key_id: uuid.UUID) -> str:
        """A new session for this key; returns the token for the cookie."""
        now = utcnow()
        token = secrets.token_urlsafe(32)
        self.session.add(
            AdminSession(
                id=hash_key(token),
                key_id=key_id,
                created_at=now,
                last_seen_at=now,
                expires_at=now + ADMIN_SESSION_IDLE,
            )
        )
        # rows of sessions long over are of no use to anyone
        old = now - ADMIN_SESSION_MAX
        await self.session.execute(SESSIONS.delete().where(or_(SESSIONS.c.expires_at < old, SESSIONS.c.ended_at < old)))
        await self.session.commit()
        return token

    async def find(self, token: str) -> tuple[AdminSession, str]:
        """The live session of this token and its key's hash; Unauthorized when it has ended."""
        found = (
            await self.session.execute(
                select(AdminSession, ApiKey.key_hash)
                .join(ApiKey, ApiKey.id == AdminSession.key_id)
                .where(AdminSession.id == hash_key(token))
            )
        ).first()
        # end the read transaction now: the key check that follows runs on a connection of its own
        await self.session.commit()
        if found is None:
            raise Unauthorized("no such session: sign in", param="session")
        row, digest = found
        expires = as_utc(row.expires_at)
        if row.ended_at is not None or (expires is not None and expires <= utcnow()):
            raise Unauthorized("this session has ended: sign in again", param="session")
        return row, str(digest)

    async def touch(self, row: AdminSession) -> None:
        """Move the idle expiry forward, at most once a minute."""
        now = utcnow()
        seen = as_utc(row.last_seen_at)
        if seen is not None and now - seen < SESSION_TOUCH:
            return
        created = as_utc(row.created_at) or now
        await self.session.execute(
            update(AdminSession)
            .where(AdminSession.id == row.id, AdminSession.ended_at.is_(None))
            .values(last_seen_at=now, expires_at=min(now + ADMIN_SESSION_IDLE, created + ADMIN_SESSION_MAX))
            .execution_options(synchronize_session=False)
        )
        await self.session.commit()

    async def end(self, token: str) -> None:
        await self.session.execute(
            update(AdminSession)
            .where(and_(AdminSession.id == hash_key(token), AdminSession.ended_at.is_(None)))
            .values(ended_at=utcnow())
            .execution_options(synchronize_session=False)
        )
        await self.session.commit()
