"""Typed answers of the native API (/api): what the OpenAPI schema at /api/schema describes.

The registry, composition and merging services describe their objects as plain dicts (the CLI prints those);
the API converts them here, at its edge (``msgspec.convert`` checks every field), so the JSON is the same
as the dict's while the handlers declare a type. A struct sets ``omit_defaults`` only where the dict leaves
a key out (never where it holds null).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any, Generic, TypeAlias, TypeVar

import msgspec
from litestar.params import QueryParameter

from composition.service import CompositionService
from core.strategies import StrategyHelp
from registry.jobs import JobService
from registry.models import Composition, Expert, Job
from registry.services import expert_summary
from serving.engine import TokenTrace

T = TypeVar("T")


class _FromDict(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """A struct filled from a service's dict by ``typed``: a key it does not name fails (none is dropped)."""


PAGE_LIMIT_MAX = 500
# The largest offset taken: an integer a JSON number carries exactly, far inside the 64-bit integer either
# database's OFFSET takes (a larger one reached SQLite as an OverflowError: a 500).
PAGE_OFFSET_MAX = 2**53 - 1
PageLimit: TypeAlias = Annotated[
    int, QueryParameter(ge=1, le=PAGE_LIMIT_MAX, description=f"items per page, 1 to {PAGE_LIMIT_MAX}")
]
PageOffset: TypeAlias = Annotated[int, QueryParameter(ge=0, le=PAGE_OFFSET_MAX, description="items to skip, 0 or more")]
"""A paginated list's query parameters: out of range is a 400 naming the parameter, before any query runs."""


class Page(msgspec.Struct, Generic[T], kw_only=True):
    """One page of a paginated list."""

    object: str = "list"
    data: list[T]
    total: int  # across every page
    limit: int
    offset: int


# -- experts ------------------------------------------------------------------------------------------------


class Lineage(_FromDict, kw_only=True):
    base: str | None  # the base model's slug
    base_id: str | None
    base_revision: str | None
    parents: list[Any]
    merge_job_id: str | None  # the merge that made it
    source_uri: str | None
    library: str | None


class Compatibility(_FromDict, kw_only=True):
    architecture: str | None
    dtype: str | None
    tokenizer_hash: str | None
    param_count: int | None
    peft_type: str | None
    r: int | None
    lora_alpha: float | None
    use_rslora: bool | None
    use_dora: bool | None
    target_modules: list[Any] | None
    modules_to_save: list[Any] | None
    rank_pattern: dict[str, Any] | None
    alpha_pattern: dict[str, Any] | None


class RoutingInfo(_FromDict, kw_only=True):
    task_description: str
    skills: list[Any]
    domains: list[Any]
    example_prompts: list[Any]


class ServingSettings(_FromDict, kw_only=True):
    """How a model served on its own is served (an adapter's are its base's, so null): the name of a chat template
    shipped with moerge in place of the model's own, and the vLLM tool-call parser reading calls from its answers."""

    chat_template: str | None
    tool_parser: str | None


class EvalOut(_FromDict, kw_only=True):
    task: str
    dataset: str | None
    metric: str
    value: float
    split: str | None
    date: str  # ISO 8601


class FileOut(_FromDict, kw_only=True):
    path: str
    sha256: str
    size: int


class Integrity(_FromDict, kw_only=True):
    manifest_sha256: str
    total_size: int
    files: list[FileOut]


class ExpertOut(_FromDict, kw_only=True):
    """An expert (a LoRA adapter or a full model): registry/services.py ``expert_summary``."""

    id: str
    slug: str
    version: int
    kind: str
    status: str
    description: str
    owner: str | None
    aliases: list[Any]
    tags: list[Any]
    lineage: Lineage
    compatibility: Compatibility
    routing: RoutingInfo
    serving: ServingSettings
    evals: list[EvalOut]
    integrity: Integrity
    license: str | None
    datasets: list[Any]
    created_at: str  # ISO 8601
    updated_at: str


class ExpertCard(msgspec.Struct, kw_only=True):
    """GET /api/experts/{ref}/card?format=json."""

    metadata: dict[str, Any]
    body: str
    markdown: str


class TrainingDataInfo(msgspec.Struct, kw_only=True):
    """The training examples attached to an expert (the rows themselves: GET ...?format=json adds `data`)."""

    expert: str
    sha256: str
    rows: int
    size: int


class TrainingData(TrainingDataInfo, kw_only=True):
    data: list[dict[str, Any]]


# -- compositions and routing ---------------------------------------------------------------------------------


class CompositionOut(_FromDict, kw_only=True):
    """A composed system, queried like a model: composition/service.py ``CompositionService.describe``."""

    name: str
    description: str | None
    router: str
    router_params: dict[str, Any]
    experts: list[str]  # in declared order
    k: int
    aggregator: str | None
    aggregator_params: dict[str, Any]
    fallback: str | None  # the fallback expert's slug
    decompose: bool
    fit_job: str | None = None  # create / update: the `fit` job training the router, when its fit is slow


class CompositionList(msgspec.Struct, kw_only=True):
    """Every composition (not paginated)."""

    object: str = "list"
    data: list[CompositionOut]


class WeightedExpert(msgspec.Struct, kw_only=True):
    slug: str
    weight: float


class TokenTraceOut(msgspec.Struct, kw_only=True):
    """A token-level mixture's choices: ``weights[l][t][e]`` is adapter ``e``'s weight on token ``t`` in layer
    ``l``; ``tokens[:prompt_tokens]`` are the prompt."""

    tokens: list[str]
    prompt_tokens: int
    experts: list[str]
    layers: list[str]
    top_k: int
    weights: list[list[list[float]]]

    @classmethod
    def of(cls, trace: TokenTrace) -> TokenTraceOut:
        return cls(
            tokens=trace.tokens,
            prompt_tokens=trace.prompt_tokens,
            experts=trace.experts,
            layers=trace.layers,
            top_k=trace.top_k,
            weights=trace.weights,
        )


class RouteOut(msgspec.Struct, kw_only=True, omit_defaults=True):
    """POST /api/route: the routing decision for a query, without generating."""

    model: str
    query: str
    router: str
    experts: list[WeightedExpert]  # the chosen, with their weights
    scores: dict[str, float]  # every candidate's score
    reason: str
    fallback: bool
    extra: dict[str, Any] | None = None  # router-specific detail (e.g. a decomposed query's parts); absent if none
    answered_by: list[str]
    aggregator: str | None
    latency_ms: float
    trace: TokenTraceOut | None = None  # asked for with `trace: true` (token-level routers)


# -- merges -------------------------------------------------------------------------------------------------


class ResultExpert(_FromDict, kw_only=True):
    id: str
    slug: str | None


class MergeInputOut(_FromDict, kw_only=True):
    expert_id: str
    weight: float | None


class JobOut(_FromDict, kw_only=True):
    """A job (merge, train or fit): registry/jobs.py ``job_summary``."""

    object: str = "job"  # "merge_job" for a merge
    id: str
    kind: str  # merge | train | fit
    status: str
    progress: float  # 0..1
    message: str
    error: str | None
    cancel_requested: bool
    result_expert: ResultExpert | None  # the registered result, once done
    updated_at: str | None  # ISO 8601
    heartbeat_at: str | None
    name: str
    method: str  # the merge method, the training recipe, the router fitted
    created_at: str | None
    owner: str | None  # the worker holding it while it runs
    attempts: int  # times a worker claimed it
    result: dict[str, Any] | None  # what it produced beyond an expert
    config: dict[str, Any] | None  # as submitted
    plan: Any  # a merge: what the worker runs, the config resolved to expert ids
    inputs: list[MergeInputOut]


# -- system -------------------------------------------------------------------------------------------------


class Health(msgspec.Struct, kw_only=True, omit_defaults=True):
    """GET /api/health: ``status`` for everyone; the rest with an admin key only."""

    status: str  # ok | degraded
    version: str | None = None
    checks: dict[str, Any] | None = None
    database_backend: str | None = None


class Ready(msgspec.Struct, kw_only=True):
    """GET /api/ready: whether this replica takes traffic (200) or not (503), and why."""

    status: str  # ready | starting | draining | database unreachable


class Engines(msgspec.Struct, kw_only=True):
    """GET /api/engines: each server's entry as the engine reports it (without an admin key, only the fields in
    api/system/controllers.py ``PUBLIC_SERVER_FIELDS``)."""

    engine: str
    servers: list[dict[str, Any]]


S = TypeVar("S")


def typed(data: Any, into: type[S]) -> S:
    """A service's dict as its API struct, every field checked."""
    return msgspec.convert(data, into)


def expert_out(expert: Expert) -> ExpertOut:
    return typed(expert_summary(expert), ExpertOut)


async def composition_out(service: CompositionService, comp: Composition) -> CompositionOut:
    return typed(await service.describe(comp), CompositionOut)


async def jobs_out(service: JobService, jobs: Sequence[Job]) -> list[JobOut]:
    return typed(await service.describe_many(jobs), list[JobOut])


async def job_out(service: JobService, job: Job) -> JobOut:
    return (await jobs_out(service, [job]))[0]


def struct_items(value: msgspec.Struct) -> list[tuple[str, Any]]:
    """A struct's (field, value) pairs in order: for a page that lists every field (the admin panel)."""
    return [(name, getattr(value, name)) for name in value.__struct_fields__]


class Strategies(msgspec.Struct, kw_only=True):
    """GET /api/strategies: every strategy a composition or a merge may name, with its help and parameters."""

    routers: list[StrategyHelp]  # query-level (`router` of a composition)
    token_routers: list[StrategyHelp]  # token-level (`router` of a composition of LoRA adapters of one base)
    aggregators: list[StrategyHelp]
    merge_methods: list[StrategyHelp]

    @classmethod
    def listed(cls) -> Strategies:
        from aggregators import AGGREGATORS
        from merging.methods import METHODS
        from routers.query import ROUTERS
        from routers.token import TOKEN_ROUTERS

        return cls(
            routers=ROUTERS.describe(),
            token_routers=TOKEN_ROUTERS.describe(),
            aggregators=AGGREGATORS.describe(),
            merge_methods=METHODS.describe(),
        )
