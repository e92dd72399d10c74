"""Registry services: the rules of registering, finding, changing and removing experts, and API keys.

The API, the CLI and the admin panel all call these; none of them repeats a rule. Registration is all or
nothing: inspection and compatibility checks run before a byte is stored, and if anything fails after
that, the new blobs, the expert's folder and the row are all taken back.
"""

from __future__ import annotations

import asyncio
import shutil
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import delete, func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from core.errors import Conflict, NotFound, ValidationFailed
from registry.inspect import (
    FolderInspection,
    check_adapter_fits_base,
    check_finetune_fits_base,
    inspect_folder,
)
from registry.limits import MAX_LORA_RANK, unservable_adapters
from registry.models import (
    Composition,
    CompositionMember,
    EvalResult,
    Expert,
    ExpertFile,
    ExpertKind,
    ExpertName,
    ExpertTrainingData,
    JobInput,
    utcnow,
)
from registry.offload import run_to_completion
from registry.schemas import SERVING_FIELDS, EvalIn, ExpertPatch, ExpertSpec
from registry.store import ArtifactStore, Damage, IngestResult, manifest_digest
from registry.training_data import referenced_blobs_query

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")


@dataclass
class Page:
    items: list[Expert]
    total: int
    limit: int
    offset: int


def _timestamp(value: datetime) -> float:
    return (value if value.tzinfo is not None else value.replace(tzinfo=UTC)).timestamp()  # SQLite drops zones


async def find_expert(session: AsyncSession, ref: str) -> Expert | None:
    """An expert by slug, id or alias (in that order)."""
    found = await session.scalar(select(Expert).where(Expert.slug == ref))
    if found is not None:
        return found
    try:
        found = await session.get(Expert, uuid.UUID(ref))
    except ValueError:
        found = None
    if found is not None:
        return found
    # An alias: one primary-key lookup in the names table.
    return await session.scalar(select(Expert).join(Expert.names).where(ExpertName.name == ref))


class ExpertService:
    def __init__(self, session: AsyncSession, store: ArtifactStore, *, max_lora_rank: int = MAX_LORA_RANK) -> None:
        self.session = session
        self.store = store
        self.max_lora_rank = max_lora_rank  # MOERGE_MAX_LORA_RANK: the largest LoRA rank registration accepts

    # -- lookup --------------------------------------------------------------------------------------
    async def find(self, ref: str) -> Expert | None:
        """An expert by slug, id or alias."""
        return await find_expert(self.session, ref)

    async def get(self, ref: str, *, param: str = "expert") -> Expert:
        expert = await self.find(ref)
        if expert is None:
            raise NotFound(f"no expert named {ref!r}", param=param, code="expert_not_found")
        return expert

    async def list_experts(
        self,
        *,
        kind: str | None = None,
        base: str | None = None,
        skill: str | None = None,
        tag: str | None = None,
        text: str | None = None,
        limit: int = 50,
        offset: int = 0,
    ) -> Page:
        """A page of experts, oldest first; ``text`` matches slug, aliases and descriptions (any case)."""
        if not 1 <= limit <= 500:
            raise ValidationFailed("limit must be between 1 and 500", param="limit")
        if offset < 0:
            raise ValidationFailed("offset must be 0 or more", param="offset")
        if kind is not None and kind not in {k.value for k in ExpertKind}:
            raise ValidationFailed(f"unknown kind {kind!r}", param="kind")
        query = select(Expert).order_by(Expert.created_at, Expert.slug)
        if kind:
            query = query.where(Expert.kind == kind)
        if base:
            base_expert = await self.get(base, param="base")
            query = query.where(Expert.base_id == base_expert.id)
        experts = list(await self.session.scalars(query))
        if skill:
            experts = [e for e in experts if skill in (e.skills or [])]
        if tag:
            experts = [e for e in experts if tag in (e.tags or [])]
        if text and (needle := text.strip().lower()):
            experts = [e for e in experts if needle in _searchable(e)]
        return Page(experts[offset : offset + limit], len(experts), limit, offset)

    async def _names_taken(self, names: Sequence[str], *, exclude: uuid.UUID | None = None) -> str | None:
        """The first of ``names`` that an expert other than ``exclude`` answers to. Checked early to refuse
        before any work; what guarantees it is the names table, which refuses a name taken in between."""
        if not names:
            return None
        query = select(ExpertName.name).where(ExpertName.name.in_(list(names)))
        if exclude is not None:
            query = query.where(ExpertName.expert_id != exclude)
        taken = set(await self.session.scalars(query))
        return next((n for n in names if n in taken), None)

    async def _name_conflict(
        self, slug: str | None, aliases: Sequence[str], *, exclude: uuid.UUID | None = None
    ) -> Conflict:
        """The Conflict for a write the database refused (call it after the rollback): the name another
        expert took meanwhile, as the early check would have named it."""
        if slug is not None and await self._names_taken([slug], exclude=exclude):
            return Conflict(f"an expert named {slug!r} already exists", param="slug", code="duplicate_slug")
        if clash := await self._names_taken(aliases, exclude=exclude):
            return Conflict(f"alias {clash!r} is already a name of another expert", param="aliases")
        # The name's holder is gone again already (deleted in between): still a clash, named as before.
        if slug is not None:
            return Conflict(f"an expert named {slug!r} already exists", param="slug", code="duplicate_slug")
        return Conflict("another expert took one of these aliases meanwhile: try again", param="aliases")

    # -- registration --------------------------------------------------------------------------------
    async def register_folder(
        self,
        folder: Path,
        spec: ExpertSpec,
        *,
        source_uri: str | None = None,
        exist_ok: bool = False,
        parents: Sequence[str] | None = None,
        merge_job_id: uuid.UUID | None = None,
        before_commit: Callable[[Expert], Awaitable[None]] | None = None,
    ) -> Expert:
        """Validate ``folder`` against ``spec`` and register it (files copied into the store).

        ``parents`` and ``merge_job_id`` record a merge's lineage (default parents: the base).
        ``before_commit`` runs in the registration's transaction once the row is flushed (a merge job marks
        itself succeeded there): if it raises, nothing is registered.
        """
        spec.validate()
        existing = await self.find(spec.slug)
        # File work (headers, hashing, copying gigabytes) runs in threads: the event loop keeps serving.
        insp = await asyncio.to_thread(inspect_folder, folder, max_lora_rank=self.max_lora_rank)
        if existing is not None:
            if exist_ok and existing.manifest_sha256 == await asyncio.to_thread(_manifest_of_folder, folder, insp):
                return existing
            raise Conflict(f"an expert named {spec.slug!r} already exists", param="slug", code="duplicate_slug")
        if clash := await self._names_taken(spec.aliases):
            raise Conflict(f"alias {clash!r} is already a name of another expert", param="aliases")
        kind = _resolve_kind(spec, insp)
        _check_served_alone(insp.kind == "adapter", {f: getattr(spec, f) for f in SERVING_FIELDS})
        base = await self._resolve_base(spec, insp, kind)
        if base is not None:
            base_insp = await asyncio.to_thread(inspect_folder, self.store.expert_dir(base.id))
            if insp.kind == "adapter":
                check_adapter_fits_base(insp, base_insp, base_slug=base.slug)
            else:
                check_finetune_fits_base(insp, base_insp, base_slug=base.slug)
        if kind == ExpertKind.base and not any(f == t for f, _ in insp.files for t in TOKENIZER_FILES):
            raise ValidationFailed(
                "a base model needs its tokenizer (tokenizer.json or tokenizer.model)", param="files"
            )

        ingest = await run_to_completion(
            self.store.ingest_folder,
            folder,
            [rel for rel, _ in insp.files],
            on_cancel=lambda done: self.store.discard_blobs(done.new_blobs, stamps=done.stamps),
        )
        expert_id = uuid.uuid4()
        try:
            expert = _expert_from(expert_id, spec, insp, kind, base, source_uri)
            expert.manifest_sha256 = manifest_digest((rel, sha) for rel, sha, _ in ingest.files)
            expert.files = [ExpertFile(path=rel, sha256=sha, size=size) for rel, sha, size in ingest.files]
            if parents is not None:
                expert.parents = list(parents)
            expert.merge_job_id = merge_job_id
            self.session.add(expert)
            await self.session.flush()
            await self._materialize(expert_id, folder, ingest)
            if before_commit is not None:
                await before_commit(expert)
            await self.session.commit()
        except BaseException as exc:
            await self.session.rollback()
            self.store.remove_expert_dir(expert_id)
            self.store.discard_blobs(ingest.new_blobs, stamps=ingest.stamps)
            if isinstance(exc, IntegrityError):  # a concurrent write took the slug or an alias first
                raise await self._name_conflict(spec.slug, spec.aliases) from exc
            raise
        await self.session.refresh(expert)
        return expert

    async def _materialize(self, expert_id: uuid.UUID, folder: Path, ingest: IngestResult) -> None:
        """The expert's folder of hard links; a blob a concurrent deletion removed after this registration
        stored it (nothing linked it yet) is stored again from ``folder`` and the folder built again."""
        files = [(rel, sha) for rel, sha, _ in ingest.files]
        for attempt in range(3):
            try:
                self.store.materialize(expert_id, files)
                return
            except FileNotFoundError:
                if attempt == 2:
                    raise
                again = await asyncio.to_thread(
                    self.store.ingest_folder,
                    folder,
                    [rel for rel, sha in files if not self.store.blob_path(sha).exists()],
                )
                ingest.new_blobs += again.new_blobs
                ingest.stamps.update(again.stamps)

    async def _resolve_base(self, spec: ExpertSpec, insp: FolderInspection, kind: ExpertKind) -> Expert | None:
        if kind == ExpertKind.base:
            if spec.base:
                raise ValidationFailed("a base model cannot itself have a base", param="base")
            return None
        ref = spec.base or (insp.base_model_name_or_path if insp.kind == "adapter" else None)
        if not ref and kind == ExpertKind.merged and insp.kind != "adapter":
            return None  # a merge of full models without a shared base stands on its own
        if not ref:
            raise ValidationFailed(
                f"a {kind.value} needs its base model: give `base` (slug of a registered base)", param="base"
            )
        base = await self.find(ref)
        if base is None:
            # adapter_config.json often names a hub id or a path: match the base's source too.
            base = await self.session.scalar(
                select(Expert).where(Expert.kind == ExpertKind.base.value, Expert.source_uri == ref)
            )
        if base is None:
            raise ValidationFailed(
                f"base model {ref!r} is not registered: register it first, or name a registered base with `base`",
                param="base",
                code="base_not_registered",
            )
        if base.kind not in (ExpertKind.base.value, ExpertKind.merged.value) or base.base_id is not None:
            raise ValidationFailed(f"{base.slug!r} is a {base.kind}, not a base model", param="base")
        return base

    # -- changes -------------------------------------------------------------------------------------
    async def patch(self, ref: str, patch: ExpertPatch) -> Expert:
        expert = await self.get(ref)
        changes = patch.changes()
        _check_served_alone(_is_lora(expert), {f: changes[f] for f in SERVING_FIELDS if f in changes})
        if "aliases" in changes and (clash := await self._names_taken(changes["aliases"], exclude=expert.id)):
            raise Conflict(f"alias {clash!r} is already a name of another expert", param="aliases")
        expert_id = expert.id  # (the rollback below expires the object)
        for name, value in changes.items():
            setattr(expert, name, value)
        expert.updated_at = utcnow()
        try:
            await self.session.commit()  # the flush rewrites its names (registry/models.py)
        except IntegrityError as exc:  # a concurrent write took one of the new aliases first
            await self.session.rollback()
            raise await self._name_conflict(None, changes.get("aliases", []), exclude=expert_id) from exc
        await self.session.refresh(expert)
        return expert

    async def add_eval(self, ref: str, result: EvalIn) -> Expert:
        expert = await self.get(ref)
        expert.evals.append(
            EvalResult(
                task=result.task,
                metric=result.metric,
                value=result.value,
                dataset=result.dataset,
                split=result.split,
            )
        )
        await self.session.commit()
        await self.session.refresh(expert)
        return expert

    async def references(self, expert: Expert) -> list[str]:
        """What still refers to ``expert``: compositions, merge jobs, experts built on it."""
        refs: list[str] = []
        compositions = await self.session.scalars(
            select(Composition.name)
            .outerjoin(CompositionMember)
            .where(or_(CompositionMember.expert_id == expert.id, Composition.fallback_id == expert.id))
            .distinct()
        )
        refs += [f"composition {name!r}" for name in compositions]
        jobs = await self.session.scalars(select(JobInput.job_id).where(JobInput.expert_id == expert.id))
        refs += [f"merge job {job}" for job in jobs]
        return refs

    async def delete(self, ref: str, *, force: bool = False) -> tuple[str, list[str]]:
        """Delete an expert (its row, folder and blobs nothing else uses). Returns its id and the names it
        answered to (slug and aliases), for unloading it from the servers that hold it."""
        expert = await self.get(ref)
        dependents = list(await self.session.scalars(select(Expert.slug).where(Expert.base_id == expert.id)))
        if dependents:
            raise Conflict(
                f"{expert.slug!r} is the base of {', '.join(map(repr, dependents))}: delete those first",
                param="expert",
                code="expert_in_use",
            )
        refs = await self.references(expert)
        if refs and not force:
            raise Conflict(
                f"{expert.slug!r} is used by {', '.join(refs)}: remove it there, or delete with force",
                param="force",
                code="expert_in_use",
            )
        if refs:
            await self.session.execute(delete(CompositionMember).where(CompositionMember.expert_id == expert.id))
            await self.session.execute(
                update(Composition).where(Composition.fallback_id == expert.id).values(fallback_id=None)
            )
            await self.session.execute(delete(JobInput).where(JobInput.expert_id == expert.id))
        expert_id = expert.id
        names = [expert.slug, *(str(a) for a in expert.aliases or [])]
        # Each blob with when it was stored (or last touched) for this expert: its files before its row was
        # written, its training data before that row; a later touch is another registration's (see below).
        own_blobs = {f.sha256: _timestamp(expert.created_at) for f in expert.files}
        for sha, attached_at in await self.session.execute(
            select(ExpertTrainingData.sha256, ExpertTrainingData.created_at).where(
                ExpertTrainingData.expert_id == expert_id
            )
        ):
            own_blobs[sha] = max(own_blobs.get(sha, 0.0), _timestamp(attached_at))
        # The folder is moved aside first so that a failed commit can put it back untouched.
        folder = self.store.expert_dir(expert_id)
        aside = self.store.tmp / f"deleted-{expert_id}"
        if folder.exists():
            self.store.ensure()
            folder.rename(aside)
        try:
            await self.session.delete(expert)
            await self.session.commit()
        except BaseException:
            await self.session.rollback()
            if aside.exists():
                aside.rename(folder)
            raise
        shutil.rmtree(aside, ignore_errors=True)
        # Only this expert's blobs that nothing else refers to: a blob another registration has just stored
        # (or reused) and not yet committed is unreferenced too, and must stay (the start-up sweep takes true
        # orphans): reused recently, or linked from another expert's folder, it is left.
        referenced = await self._referenced_blobs()
        for sha, stored_at in own_blobs.items():
            if sha not in referenced:
                self.store.discard_blobs([sha], untouched_since=stored_at)
        return str(expert_id), names

    async def _referenced_blobs(self) -> set[str]:
        referenced = set(await self.session.scalars(select(ExpertFile.sha256).distinct()))
        # Attached training data sets live in the same store (registry/training_data.py).
        referenced |= set(await self.session.scalars(referenced_blobs_query()))
        return referenced

    async def sweep_store(self, *, min_age_s: float) -> list[Path]:
        """Clear the store of what a killed process left mid-registration (see ``ArtifactStore.sweep``)."""
        experts = {str(i) for i in await self.session.scalars(select(Expert.id))}
        referenced = await self._referenced_blobs()
        return await asyncio.to_thread(self.store.sweep, referenced, experts, min_age_s=min_age_s)

    async def verify(self, ref: str | None = None) -> dict[str, list[Damage]]:
        experts = [await self.get(ref)] if ref else list(await self.session.scalars(select(Expert)))
        report: dict[str, list[Damage]] = {}
        for expert in experts:
            damage = self.store.verify((f.path, f.sha256) for f in expert.files)
            folder = self.store.expert_dir(expert.id)
            damage += [
                Damage(f.path, f.sha256, "missing from the expert's folder")
                for f in expert.files
                if not (folder / f.path).exists()
            ]
            report[expert.slug] = damage
        return report

    async def unservable(self, ref: str | None = None) -> list[dict[str, str]]:
        """LoRA rows that cannot be served under this service's rank limit (``registry.limits``)."""
        found = await unservable_adapters(self.session, self.max_lora_rank)
        if ref is None:
            return found
        expert = await self.get(ref)
        return [entry for entry in found if entry["id"] == str(expert.id)]

    async def count_by_kind(self) -> dict[str, int]:
        rows = await self.session.execute(select(Expert.kind, func.count()).group_by(Expert.kind))
        return {kind: count for kind, count in rows.all()}


def _is_lora(expert: Expert) -> bool:
    """An adapter, or a merge whose output is a LoRA: served on its base's server."""
    return expert.kind == ExpertKind.adapter.value or bool(expert.kind == ExpertKind.merged.value and expert.peft_type)


def _check_served_alone(lora: bool, settings: dict[str, str | None]) -> None:
    """A LoRA runs on its base's server, with the base's chat template and tool parser: it sets neither."""
    if not lora:
        return
    for field, value in settings.items():
        if value is not None:
            raise ValidationFailed(
                f"{field}: a LoRA adapter is served with its base model's chat template and tool parser; "
                "set it on the base",
                param=field,
            )


def _searchable(expert: Expert) -> str:
    return " ".join(
        [expert.slug, *(expert.aliases or []), expert.description or "", expert.task_description or ""]
    ).lower()


def _resolve_kind(spec: ExpertSpec, insp: FolderInspection) -> ExpertKind:
    if insp.kind == "adapter":
        if spec.kind not in (None, ExpertKind.adapter.value, ExpertKind.merged.value):
            raise ValidationFailed(
                f"the folder holds a LoRA adapter (adapter_config.json), not a {spec.kind}", param="kind"
            )
        return ExpertKind(spec.kind or ExpertKind.adapter.value)
    if spec.kind == ExpertKind.adapter.value:
        raise ValidationFailed("kind is adapter but the folder has no adapter_config.json", param="kind")
    if spec.kind is not None:
        return ExpertKind(spec.kind)
    return ExpertKind.finetune if spec.base else ExpertKind.base


def _manifest_of_folder(folder: Path, insp: FolderInspection) -> str:
    from registry.store import sha256_file

    return manifest_digest((rel, sha256_file(folder / rel)) for rel, _ in insp.files)


def _expert_from(
    expert_id: uuid.UUID,
    spec: ExpertSpec,
    insp: FolderInspection,
    kind: ExpertKind,
    base: Expert | None,
    source_uri: str | None,
) -> Expert:
    meta = insp.card_metadata or {}
    return Expert(
        id=expert_id,
        slug=spec.slug,
        version=spec.version,
        aliases=list(spec.aliases),
        tags=list(dict.fromkeys([*spec.tags, *(meta.get("tags") or [])])),
        description=spec.description or str(meta.get("description") or ""),
        owner=spec.owner,
        kind=kind.value,
        base_id=base.id if base else None,
        base_revision=spec.base_revision,
        parents=[str(base.id)] if base else [],
        source_uri=spec.source_uri or source_uri,
        library="peft" if insp.kind == "adapter" else "transformers",
        architecture=insp.architecture or (base.architecture if base else None),
        dtype=insp.dtype,
        tokenizer_hash=insp.tokenizer_hash or (base.tokenizer_hash if base else None),
        param_count=insp.param_count,
        peft_type=insp.peft_type,
        r=insp.r,
        lora_alpha=insp.lora_alpha,
        use_rslora=insp.use_rslora,
        use_dora=insp.use_dora,
        target_modules=list(insp.target_modules or []),
        modules_to_save=insp.modules_to_save,
        rank_pattern=dict(insp.rank_pattern or {}),
        alpha_pattern=dict(insp.alpha_pattern or {}),
        task_description=spec.task_description,
        skills=list(spec.skills),
        domains=list(spec.domains),
        example_prompts=list(spec.example_prompts),
        total_size=insp.total_size,
        license=spec.license or (str(meta["license"]) if meta.get("license") else None),
        datasets=list(spec.datasets or meta.get("datasets") or []),
        card_metadata=dict(meta),
        card_body=insp.card_body,
        chat_template=spec.chat_template,
        tool_parser=spec.tool_parser,
    )


# -- API keys: their rules live in registry/keys.py; these names stay importable from here too --------------
from registry.keys import KEY_PREFIX, SCOPES, ApiKeyService, check_scope, hash_key  # noqa: E402, F401


def expert_summary(expert: Expert) -> dict[str, Any]:
    """The JSON shape of an expert for the API and `moerge expert show --json`."""
    return {
        "id": str(expert.id),
        "slug": expert.slug,
        "version": expert.version,
        "kind": expert.kind,
        "status": expert.status,
        "description": expert.description,
        "owner": expert.owner,
        "aliases": expert.aliases,
        "tags": expert.tags,
        "lineage": {
            "base": expert.base.slug if expert.base else None,
            "base_id": str(expert.base_id) if expert.base_id else None,
            "base_revision": expert.base_revision,
            "parents": expert.parents,
            "merge_job_id": str(expert.merge_job_id) if expert.merge_job_id else None,
            "source_uri": expert.source_uri,
            "library": expert.library,
        },
        "compatibility": {
            "architecture": expert.architecture,
            "dtype": expert.dtype,
            "tokenizer_hash": expert.tokenizer_hash,
            "param_count": expert.param_count,
            "peft_type": expert.peft_type,
            "r": expert.r,
            "lora_alpha": expert.lora_alpha,
            "use_rslora": expert.use_rslora,
            "use_dora": expert.use_dora,
            "target_modules": expert.target_modules,
            "modules_to_save": expert.modules_to_save,
            "rank_pattern": expert.rank_pattern,
            "alpha_pattern": expert.alpha_pattern,
        },
        "routing": {
            "task_description": expert.task_description,
            "skills": expert.skills,
            "domains": expert.domains,
            "example_prompts": expert.example_prompts,
        },
        "serving": {"chat_template": expert.chat_template, "tool_parser": expert.tool_parser},
        "evals": [
            {
                "task": e.task,
                "dataset": e.dataset,
                "metric": e.metric,
                "value": e.value,
                "split": e.split,
                "date": e.created_at.isoformat(),
            }
            for e in expert.evals
        ],
        "integrity": {
            "manifest_sha256": expert.manifest_sha256,
            "total_size": expert.total_size,
            "files": [{"path": f.path, "sha256": f.sha256, "size": f.size} for f in expert.files],
        },
        "license": expert.license,
        "datasets": expert.datasets,
        "created_at": expert.created_at.isoformat(),
        "updated_at": expert.updated_at.isoformat(),
    }
