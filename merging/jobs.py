"""Merge jobs: submitting one. A merge is a job of kind ``merge`` in the jobs table (``registry/jobs.py``);
a worker runs it (``jobs/merge.py``).

``MergeJobService.submit`` takes a request (JSON or mergekit-style YAML), checks it completely (method and
parameters, every named expert registered, the inputs compatible: ``merging/plan.py``) and only then
writes a ``queued`` row, with the experts pinned by id (a later rename or new alias does not change what the
job merges). ``resolve`` rebuilds the same plan from the row when the worker runs it.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

import msgspec
from sqlalchemy.ext.asyncio import AsyncSession

from core.errors import ValidationFailed
from merging.config import CheckedRequest, check_request, parse_request
from merging.plan import MergePlan, ModelRef, plan_merge
from registry.jobs import JobService
from registry.models import Expert, Job, JobKind
from registry.services import find_expert
from registry.store import ArtifactStore


@dataclass
class ResolvedMerge:
    """A checked request with its experts found and its plan made."""

    plan: MergePlan
    base: Expert | None
    inputs: list[Expert]

    def lineage_base(self) -> uuid.UUID | None:
        """The base the merged expert records: the plan's base (or that model's own base when it is a
        finetune), else the one base all inputs share."""
        if self.base is not None:
            return self.base.base_id or self.base.id
        bases = {e.base_id for e in self.inputs}
        return bases.pop() if len(bases) == 1 else None

    def parents(self) -> list[str]:
        experts = [self.base, *self.inputs] if self.base is not None else self.inputs
        return list(dict.fromkeys(str(e.id) for e in experts))


class MergeJobService(JobService):
    """The jobs of kind ``merge``: list, get, cancel and describe as any job; submit and resolve as merges."""

    def __init__(self, session: AsyncSession, store: ArtifactStore) -> None:
        super().__init__(session, kind=JobKind.merge.value)
        self.store = store

    async def submit_merge(
        self, raw: bytes | str | dict[str, Any], *, yaml_text: bool = False, claimed_by: str | None = None
    ) -> Job:
        """Check the request completely, then write the job (``queued``; ``running`` and held by
        ``claimed_by``, as ``moerge merge`` does). Nothing is written when a check fails."""
        checked = check_request(parse_request(raw, yaml_text=yaml_text))
        resolved = await self.resolve(checked)
        request = checked.request
        name = request.name or f"{checked.method.name}-{uuid.uuid4().hex[:8]}"
        config = msgspec.to_builtins(msgspec.structs.replace(request, name=name))
        params = {
            "config": config,
            "plan": resolved.plan.summary(),
            # The experts as found now: a later rename or new alias does not change what this job merges.
            "resolved": {
                "base_model": str(resolved.base.id) if resolved.base is not None else None,
                "models": [str(e.id) for e in resolved.inputs],
            },
        }
        weights: dict[uuid.UUID, float | None] = {}
        for expert, parameters in zip(resolved.inputs, checked.input_parameters, strict=True):
            weight = parameters.get("weight")
            weights.setdefault(expert.id, float(weight) if isinstance(weight, int | float) else None)
        if resolved.base is not None:
            weights.setdefault(resolved.base.id, None)
        return await self.submit(
            JobKind.merge.value,
            checked.method.name,
            params,
            result_name=name,
            inputs=list(weights.items()),
            claimed_by=claimed_by,
        )

    async def resolve(self, checked: CheckedRequest, pinned: dict[str, Any] | None = None) -> ResolvedMerge:
        """Find every named expert (by the ids in ``pinned`` when given) and plan the merge from their
        folders; errors name the request field."""
        request = checked.request
        pinned = pinned or {}
        base: Expert | None = None
        base_ref: ModelRef | None = None
        if request.base_model is not None:
            base = await self._expert(request.base_model, "base_model", pinned.get("base_model"))
            base_ref = self._ref(request.base_model, base)
        entries = checked.models
        ids = pinned.get("models") or [None] * len(entries)
        inputs = [await self._expert(entry.model, checked.model_param(i), ids[i]) for i, entry in enumerate(entries)]
        refs = [self._ref(entry.model, e) for entry, e in zip(entries, inputs, strict=True)]
        plan = plan_merge(checked, base_ref, refs)
        return ResolvedMerge(plan, base, inputs)

    def _ref(self, ref: str, expert: Expert) -> ModelRef:
        return ModelRef(ref, self.store.expert_dir(expert.id), expert_id=expert.id, base_id=expert.base_id)

    async def _expert(self, ref: str, param: str, pinned: str | None) -> Expert:
        if pinned is not None:
            expert = await self.session.get(Expert, uuid.UUID(pinned))
            if expert is None:
                raise ValidationFailed(
                    f"{param}: {ref!r} was deleted after the job was submitted", param=param, code="expert_not_found"
                )
            return expert
        found = await find_expert(self.session, ref)
        if found is None:
            raise ValidationFailed(f"{param}: no registered expert named {ref!r}", param=param, code="expert_not_found")
        return found
