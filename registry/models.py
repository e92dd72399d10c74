"""SQLAlchemy 2 models of the registry: experts, their files and evals, compositions, API keys (their usage
and admin sessions), merge jobs, and per-minute traffic counts (the admin dashboard's charts).

The database holds metadata only; weights live in the content-addressed store (``registry/store.py``).
Types are portable between SQLite and PostgreSQL (``Uuid``, ``JSON`` with a JSONB variant).
"""

from __future__ import annotations

import enum
import uuid
from datetime import UTC, datetime
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
    Uuid,
    event,
    false,
    inspect,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship

JSONType = JSON().with_variant(JSONB(), "postgresql")


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    type_annotation_map: ClassVar[dict[Any, Any]] = {dict[str, Any]: JSONType, list[Any]: JSONType}


class ExpertKind(enum.StrEnum):
    base = "base"
    adapter = "adapter"
    finetune = "finetune"
    merged = "merged"


class ExpertStatus(enum.StrEnum):
    active = "active"
    deprecated = "deprecated"


class Expert(Base):
    __tablename__ = "experts"

    # identity
    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    slug: Mapped[str] = mapped_column(String(128), unique=True, index=True)
    version: Mapped[int] = mapped_column(Integer, default=1)
    aliases: Mapped[list[Any]] = mapped_column(default=list)
    tags: Mapped[list[Any]] = mapped_column(default=list)
    description: Mapped[str] = mapped_column(Text, default="")
    owner: Mapped[str | None] = mapped_column(String(128))
    status: Mapped[str] = mapped_column(String(32), default=ExpertStatus.active.value)

    # lineage
    kind: Mapped[str] = mapped_column(String(16), index=True)
    base_id: Mapped[uuid.UUID | None] = mapped_column(Uuid, ForeignKey("experts.id", ondelete="RESTRICT"), index=True)
    base_revision: Mapped[str | None] = mapped_column(String(128))
    parents: Mapped[list[Any]] = mapped_column(default=list)
    merge_job_id: Mapped[uuid.UUID | None] = mapped_column(Uuid)
    source_uri: Mapped[str | None] = mapped_column(Text)
    library: Mapped[str | None] = mapped_column(String(32))

    # compatibility
    architecture: Mapped[str | None] = mapped_column(String(128))
    dtype: Mapped[str | None] = mapped_column(String(32))
    tokenizer_hash: Mapped[str | None] = mapped_column(String(64))
    param_count: Mapped[int | None] = mapped_column(BigInteger)
    peft_type: Mapped[str | None] = mapped_column(String(32))
    r: Mapped[int | None] = mapped_column(Integer)
    lora_alpha: Mapped[float | None] = mapped_column(Float)
    use_rslora: Mapped[bool | None] = mapped_column(Boolean)
    use_dora: Mapped[bool | None] = mapped_column(Boolean)
    target_modules: Mapped[list[Any]] = mapped_column(default=list)
    modules_to_save: Mapped[list[Any] | None] = mapped_column(JSONType)
    rank_pattern: Mapped[dict[str, Any]] = mapped_column(default=dict)
    alpha_pattern: Mapped[dict[str, Any]] = mapped_column(default=dict)

    # routing
    task_description: Mapped[str] = mapped_column(Text, default="")
    skills: Mapped[list[Any]] = mapped_column(default=list)
    domains: Mapped[list[Any]] = mapped_column(default=list)
    example_prompts: Mapped[list[Any]] = mapped_column(default=list)

    # serving (a model served on its own: a base, finetune or merged full model; an adapter runs with its base's):
    # the name of a chat template shipped with moerge (registry/chat_templates) in place of the model's own, and
    # the vLLM tool-call parser that reads calls out of its answers (registry/schemas.py TOOL_PARSERS)
    chat_template: Mapped[str | None] = mapped_column(String(64))
    tool_parser: Mapped[str | None] = mapped_column(String(64))

    # integrity and licence
    manifest_sha256: Mapped[str] = mapped_column(String(64), index=True)
    total_size: Mapped[int] = mapped_column(BigInteger, default=0)
    license: Mapped[str | None] = mapped_column(String(64))
    datasets: Mapped[list[Any]] = mapped_column(default=list)

    # model card: front matter kept as given, body as markdown
    card_metadata: Mapped[dict[str, Any]] = mapped_column(default=dict)
    card_body: Mapped[str | None] = mapped_column(Text)

    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow)

    base: Mapped[Expert | None] = relationship(remote_side=[id], lazy="joined", join_depth=1)
    files: Mapped[list[ExpertFile]] = relationship(
        back_populates="expert", cascade="all, delete-orphan", lazy="selectin", order_by="ExpertFile.path"
    )
    evals: Mapped[list[EvalResult]] = relationship(
        back_populates="expert",
        cascade="all, delete-orphan",
        lazy="selectin",
        order_by="EvalResult.created_at",
    )
    # Every name it answers to (its slug and aliases), kept in step with ``slug`` and ``aliases`` on each
    # flush (``_sync_expert_names``): the table, not a check in Python, keeps names unique across experts.
    # Deleting an expert leaves its rows to the database's ON DELETE CASCADE.
    names: Mapped[list[ExpertName]] = relationship(
        back_populates="expert", cascade="all, delete-orphan", passive_deletes=True
    )

    def wanted_names(self) -> dict[str, str]:
        """name -> kind ('slug' or 'alias'): its slug, then its aliases (its own slug or a repeat once)."""
        wanted = {self.slug: ExpertNameKind.slug.value}
        for alias in self.aliases or []:
            wanted.setdefault(alias, ExpertNameKind.alias.value)
        return wanted


class ExpertNameKind(enum.StrEnum):
    slug = "slug"
    alias = "alias"


class ExpertName(Base):
    """One name an expert answers to. ``name`` is the primary key, so two experts can share neither a slug
    nor an alias, nor one's alias be another's slug: of two registrations (or an update and a registration)
    racing for a name, the database refuses the second whatever either checked before."""

    __tablename__ = "expert_names"

    name: Mapped[str] = mapped_column(String(128), primary_key=True)
    expert_id: Mapped[uuid.UUID] = mapped_column(Uuid, ForeignKey("experts.id", ondelete="CASCADE"), index=True)
    kind: Mapped[str] = mapped_column(String(8))

    expert: Mapped[Expert] = relationship(back_populates="names")


@event.listens_for(Session, "before_flush")
def _sync_expert_names(session: Session, _context: Any, _instances: Any) -> None:
    """Give each new expert, and each whose slug or aliases changed, the name rows it should have, in the
    flush that writes it: whatever code adds or edits an expert, its names commit (or fail) with it."""
    for obj in [*session.new, *session.dirty]:
        if not isinstance(obj, Expert) or obj in session.deleted:
            continue
        state = inspect(obj)
        if obj not in session.new and not any(state.attrs[a].history.has_changes() for a in ("slug", "aliases")):
            continue
        wanted = obj.wanted_names()
        kept: list[ExpertName] = []
        for row in obj.names:  # loaded here (inside the flush) for an existing expert
            if row.name in wanted:
                row.kind = wanted.pop(row.name)
                kept.append(row)
        # Names it no longer has are deleted (delete-orphan); new ones inserted, in the same flush.
        obj.names = kept + [ExpertName(name=name, kind=kind) for name, kind in wanted.items()]


class ExpertFile(Base):
    """One file of an expert's folder: its relative path and the sha256 of its bytes in the store."""

    __tablename__ = "expert_files"
    __table_args__ = (UniqueConstraint("expert_id", "path"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    expert_id: Mapped[uuid.UUID] = mapped_column(Uuid, ForeignKey("experts.id", ondelete="CASCADE"), index=True)
    path: Mapped[str] = mapped_column(String(512))
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    size: Mapped[int] = mapped_column(BigInteger)

    expert: Mapped[Expert] = relationship(back_populates="files")


class EvalResult(Base):
    __tablename__ = "eval_results"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    expert_id: Mapped[uuid.UUID] = mapped_column(Uuid, ForeignKey("experts.id", ondelete="CASCADE"), index=True)
    task: Mapped[str] = mapped_column(String(128))
    dataset: Mapped[str | None] = mapped_column(String(256))
    metric: Mapped[str] = mapped_column(String(64))
    value: Mapped[float] = mapped_column(Float)
    split: Mapped[str | None] = mapped_column(String(32))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    expert: Mapped[Expert] = relationship(back_populates="evals")


class Composition(Base):
    """A named composed system: router + params, k, aggregator + params, fallback; queried like a model."""

    __tablename__ = "compositions"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    name: Mapped[str] = mapped_column(String(128), unique=True, index=True)
    description: Mapped[str] = mapped_column(Text, default="")
    router: Mapped[str] = mapped_column(String(64))
    router_params: Mapped[dict[str, Any]] = mapped_column(default=dict)
    k: Mapped[int] = mapped_column(Integer, default=1)
    aggregator: Mapped[str | None] = mapped_column(String(64))
    aggregator_params: Mapped[dict[str, Any]] = mapped_column(default=dict)
    fallback_id: Mapped[uuid.UUID | None] = mapped_column(Uuid, ForeignKey("experts.id", ondelete="RESTRICT"))
    # Route each numbered part of a multi-part query to its own expert (routers/query/parts.py).
    decompose: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    # The expert slugs as declared: members removed by a forced expert delete are noticed (and named)
    # at query time instead of the composition silently routing among fewer experts.
    declared_experts: Mapped[list[Any]] = mapped_column(default=list)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow)

    members: Mapped[list[CompositionMember]] = relationship(
        back_populates="composition", cascade="all, delete-orphan", lazy="selectin"
    )


class CompositionMember(Base):
    __tablename__ = "composition_members"

    composition_id: Mapped[uuid.UUID] = mapped_column(
        Uuid, ForeignKey("compositions.id", ondelete="CASCADE"), primary_key=True
    )
    expert_id: Mapped[uuid.UUID] = mapped_column(
        Uuid, ForeignKey("experts.id", ondelete="RESTRICT"), primary_key=True, index=True
    )

    composition: Mapped[Composition] = relationship(back_populates="members")


class RouterState(Base):
    """A router's fitted state for one expert (embeddings, a skill profile, k-shot results), stored per
    (router, config hash, expert) and refitted only when the expert's routing fields change."""

    __tablename__ = "router_states"
    __table_args__ = (UniqueConstraint("router", "config_hash", "expert_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    router: Mapped[str] = mapped_column(String(64))
    config_hash: Mapped[str] = mapped_column(String(64))
    expert_id: Mapped[uuid.UUID] = mapped_column(Uuid, ForeignKey("experts.id", ondelete="CASCADE"), index=True)
    fingerprint: Mapped[str] = mapped_column(String(64))  # of the expert's routing fields when fitted
    payload: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class ApiKey(Base):
    """An API key, stored as the sha256 of its secret; only the prefix is kept in clear to identify it.

    Its limits (LiteLLM's virtual keys are the model): an allow-list of model names (None: every model),
    requests and tokens per minute, and a budget of tokens in all. ``requests_total`` / ``tokens_total``
    are its usage so far; the per-minute counts live in ``key_usage``."""

    __tablename__ = "api_keys"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    name: Mapped[str] = mapped_column(String(128))
    prefix: Mapped[str] = mapped_column(String(16), index=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    scopes: Mapped[list[Any]] = mapped_column(default=list)
    revoked: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    last_used_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    models: Mapped[list[Any] | None] = mapped_column(JSONType)
    rpm_limit: Mapped[int | None] = mapped_column(BigInteger)
    tpm_limit: Mapped[int | None] = mapped_column(BigInteger)
    token_budget: Mapped[int | None] = mapped_column(BigInteger)
    requests_total: Mapped[int] = mapped_column(BigInteger, default=0, server_default=text("0"))
    tokens_total: Mapped[int] = mapped_column(BigInteger, default=0, server_default=text("0"))
    rotated_from_id: Mapped[uuid.UUID | None] = mapped_column(Uuid)  # the key this one replaced


class KeyUsage(Base):
    """What one key used in one clock minute (``minute``: Unix time // 60), for keys with per-minute limits
    or a budget: one row per key and minute, bumped by a single atomic upsert per request."""

    __tablename__ = "key_usage"

    key_id: Mapped[uuid.UUID] = mapped_column(Uuid, ForeignKey("api_keys.id", ondelete="CASCADE"), primary_key=True)
    minute: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    requests: Mapped[int] = mapped_column(BigInteger, default=0)
    tokens: Mapped[int] = mapped_column(BigInteger, default=0)


class AdminSession(Base):
    """A signed-in admin panel session. The cookie holds a random token; the row is keyed by its sha256
    (a database reader cannot take over a session). Signing out, or revoking the key, sets ``ended_at``."""

    __tablename__ = "admin_sessions"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    key_id: Mapped[uuid.UUID] = mapped_column(Uuid, ForeignKey("api_keys.id", ondelete="CASCADE"), index=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    last_seen_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    ended_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class JobStatus(enum.StrEnum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"


PENDING_JOB_SQL = f"status IN ('{JobStatus.queued.value}', '{JobStatus.running.value}')"


class JobKind(enum.StrEnum):
    merge = "merge"  # a merge (merging/), its result registered as a `merged` expert
    train = "train"  # an expert trained from a recipe and data, registered as an adapter
    fit = "fit"  # a composition's router states (prototypes, gates, mixers), stored as router artifacts


class Job(Base):
    """One long task run by a worker (jobs/); the row is the source of truth for its state. A worker holds a
    ``running`` job while its ``heartbeat_at`` is fresh (the lease; ``owner`` names the worker); a job whose
    heartbeat went stale is settled by any worker (jobs/worker.py ``recover``)."""

    __tablename__ = "jobs"
    # Two jobs queued or running at once never promise the same result name: the database refuses the second
    # (a check before the insert alone would let two racing requests both pass it, then both do the work).
    __table_args__ = (
        Index(
            "uq_jobs_pending_result_name",
            "result_name",
            unique=True,
            sqlite_where=text(PENDING_JOB_SQL),
            postgresql_where=text(PENDING_JOB_SQL),
        ),
    )

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    kind: Mapped[str] = mapped_column(String(16), default=JobKind.merge.value, server_default="merge", index=True)
    status: Mapped[str] = mapped_column(String(16), default=JobStatus.queued.value, index=True)
    method: Mapped[str] = mapped_column(String(64))  # what it runs: the merge method, the recipe, the router
    result_name: Mapped[str | None] = mapped_column(String(128))  # the slug the result will be registered as
    params: Mapped[dict[str, Any]] = mapped_column(default=dict)
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    message: Mapped[str] = mapped_column(Text, default="")
    error: Mapped[str | None] = mapped_column(Text)
    result: Mapped[dict[str, Any] | None] = mapped_column()  # what it produced beyond an expert (a summary)
    result_expert_id: Mapped[uuid.UUID | None] = mapped_column(Uuid, ForeignKey("experts.id", ondelete="SET NULL"))
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    owner: Mapped[str | None] = mapped_column(String(128))  # the worker holding the lease
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")  # times a worker claimed it
    heartbeat_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow)

    inputs: Mapped[list[JobInput]] = relationship(back_populates="job", cascade="all, delete-orphan", lazy="selectin")


class JobInput(Base):
    """A merge job's input expert (kept while the job exists: such an expert cannot be deleted)."""

    __tablename__ = "job_inputs"

    job_id: Mapped[uuid.UUID] = mapped_column(Uuid, ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    expert_id: Mapped[uuid.UUID] = mapped_column(
        Uuid, ForeignKey("experts.id", ondelete="RESTRICT"), primary_key=True, index=True
    )
    weight: Mapped[float | None] = mapped_column(Float)

    job: Mapped[Job] = relationship(back_populates="inputs")


class RegistryEpoch(Base):
    """One row: a counter bumped in the same transaction as any change to experts, their files and evals,
    compositions or API keys, so a process can tell in one query whether what it memoized from the
    registry still holds (another process, the CLI say, may have written). ``instance`` is drawn when the
    database is created: memos of a dropped and recreated database never match."""

    __tablename__ = "registry_epoch"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    instance: Mapped[str] = mapped_column(String(36))
    value: Mapped[int] = mapped_column(BigInteger, default=0)


class ExpertTrainingData(Base):
    """The training examples attached to an expert (PHATGOOSE trains its gates on them): canonical JSONL
    in the content-addressed store under ``sha256``; one row per expert, replaced when new data is sent."""

    __tablename__ = "expert_training_data"

    expert_id: Mapped[uuid.UUID] = mapped_column(Uuid, ForeignKey("experts.id", ondelete="CASCADE"), primary_key=True)
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    rows: Mapped[int] = mapped_column(Integer)
    size: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class ModelMinute(Base):
    """Requests one model answered in one clock minute (``minute``: Unix time // 60), summed over every process:
    each adds its own counts about once a minute (registry/metrics.py). The admin dashboard's charts read them."""

    __tablename__ = "model_minutes"

    minute: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    model: Mapped[str] = mapped_column(String(128), primary_key=True)  # an expert's slug or a composition's name
    kind: Mapped[str] = mapped_column(String(16), primary_key=True)  # ExpertKind, or "composition"
    requests: Mapped[int] = mapped_column(BigInteger, default=0)
    errors: Mapped[int] = mapped_column(BigInteger, default=0)  # answered with a status of 400 or more
    latency_s: Mapped[float] = mapped_column(Float, default=0.0)  # the requests' durations, summed


class RoutingMinute(Base):
    """How often a composition's router chose each expert in one clock minute, summed over every process."""

    __tablename__ = "routing_minutes"

    minute: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    composition: Mapped[str] = mapped_column(String(128), primary_key=True)
    expert: Mapped[str] = mapped_column(String(128), primary_key=True)
    decisions: Mapped[int] = mapped_column(BigInteger, default=0)
