"""From a `model` name to what runs it: an expert's base (+ adapter), or a composition's choice."""

from __future__ import annotations

from dataclasses import dataclass, field

from sqlalchemy.ext.asyncio import AsyncSession

from registry.compositions import CompositionService
from registry.errors import NotFound, ValidationFailed
from registry.models import Expert, ExpertKind
from registry.services import ExpertService
from registry.store import ArtifactStore
from serving.engine import Target


@dataclass
class Resolved:
    """What answers a request, and the routing facts reported in the x-moerge-* headers."""

    model: str
    target: Target
    router: str = "none"
    experts: list[str] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)


def target_for(expert: Expert, store: ArtifactStore) -> Target:
    """An adapter (or a merged LoRA) runs on its base's server; a full model runs on its own."""
    if expert.kind == ExpertKind.adapter.value or (expert.kind == ExpertKind.merged.value and expert.peft_type):
        if expert.base is None:
            raise ValidationFailed(f"adapter {expert.slug!r} has no registered base", param="model")
        return Target(
            base_id=str(expert.base.id),
            base_dir=store.expert_dir(expert.base.id),
            adapter_id=str(expert.id),
            adapter_dir=store.expert_dir(expert.id),
            max_lora_rank=int(expert.r or 8),
            served_name=expert.slug,
        )
    return Target(base_id=str(expert.id), base_dir=store.expert_dir(expert.id), served_name=expert.slug)


async def resolve_model(session: AsyncSession, store: ArtifactStore, name: str) -> Resolved:
    compositions = CompositionService(session, store)
    comp = await compositions.find(name)
    if comp is not None:
        members = await compositions.member_experts(comp)
        if comp.router != "direct":
            raise ValidationFailed(f"composition {name!r} uses router {comp.router!r}, not served yet", param="model")
        if not members:
            raise ValidationFailed(
                f"composition {name!r} has no expert left (was it deleted?): update the composition",
                param="model",
                code="composition_has_no_experts",
            )
        expert = members[0]
        return Resolved(name, target_for(expert, store), "direct", [expert.slug], [1.0])
    found = await ExpertService(session, store).find(name)
    if found is None:
        raise NotFound(f"The model `{name}` does not exist", param="model", code="model_not_found")
    return Resolved(name, target_for(found, store), "none", [found.slug], [1.0])
