"""Compositions whose router is token-level (``routers/token``): their adapters mixed per token and module
inside one model, run by the torch engine.

Resolving such a composition routes nothing per query (the routing happens per token, in the engine): it
builds a ``TokenMixture`` target from the composition's adapters and their router states (the stored router
artifacts), memoized while the registry stands still. ``glider`` adds a per-query bias: the base model
describes the query's task (GLIDER's global router, the `instruct` query router) and every adapter's
expert is scored by how well its description matches.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from aggregators import Aggregator
from composition.plan import Plan
from composition.resolve import expert_target, target_for
from composition.service import CompositionSpec
from core.errors import Conflict, ValidationFailed
from registry.compositions import CompositionView
from registry.epoch import Stamp, StampedMemo, registry_stamp
from registry.jobs import JobService
from registry.limits import MAX_LORA_RANK
from registry.models import CompositionMember, Expert, Job, JobKind
from registry.store import ArtifactStore
from routers.query import ROUTERS, RouteDecision, RouterContext
from routers.query.service import RoutingService, candidate_of
from serving.engine import Target, TokenMixture

if TYPE_CHECKING:
    from routers.token import TokenRouter


def _serving(base: Target) -> dict[str, Any]:
    """The base's serving settings a mixture on it keeps (its server is started with them: a mixture's Target
    without them would look like other settings and restart the server)."""
    return {"chat_template": base.chat_template, "tool_parser": base.tool_parser}


def is_token_level(router: str) -> bool:
    from routers.token import TOKEN_ROUTERS  # torch: imported where a token router is actually in play

    return router in TOKEN_ROUTERS


async def token_states(
    session: AsyncSession,
    store: ArtifactStore,
    router: str,
    params: dict[str, Any],
    experts: list[Expert],
    *,
    check_only: bool = False,
    on_fitted: Callable[[int, int], None] | None = None,
    on_step: Callable[[int, int, float], None] | None = None,
) -> list[dict[str, Any]]:
    """Every adapter's router state (module -> vector: Arrow prototypes, PHATGOOSE gates), fitted once per
    expert and kept as a router artifact (``routers/token/states.py``)."""
    from routers.token.states import token_router_states

    return await token_router_states(
        session, store, router, params, experts, check_only=check_only, on_fitted=on_fitted, on_step=on_step
    )


def fit_is_slow(router: str, params: dict[str, Any]) -> bool:
    """Whether fitting ``router`` trains something (PHATGOOSE gates, a mixer) or runs a model (`instruct`,
    `kshot`, glider's global part): minutes, so it runs as a `fit` job rather than in the request."""
    query_level = [(router, params)]
    if is_token_level(router):
        from routers.token import TOKEN_ROUTERS

        if TOKEN_ROUTERS.build(router, params).fit_trains():
            return True
        part = _router_class(router).query_part(params)
        query_level = [part] if part is not None else []
    return any(ROUTERS.get(name).cls.fit_uses_model for name, _ in query_level)


async def fit_router(
    session: AsyncSession,
    store: ArtifactStore,
    context: RouterContext,
    router: str,
    params: dict[str, Any],
    experts: list[Expert],
    *,
    run_models: bool = True,
    check_only: bool = False,
    on_fitted: Callable[[int, int], None] | None = None,
    on_step: Callable[[int, int, float], None] | None = None,
) -> None:
    """Fit a composition's router states now (on create or update, or in a `fit` job), query-level or
    token-level, with a token router's query-level part (``query_part``). ``run_models=False`` (the CLI, which
    has no engine): a router whose fitting runs a model is left for the server to fit on its first query.
    ``check_only``: what fitting would refuse (an expert without the training data it needs), nothing fitted.
    ``on_fitted(done, total)``: after each expert's state is fitted; ``on_step(step, steps, loss)``:
    while a router trained for the whole set (``mixer``) trains (a `fit` job's progress)."""
    query_level = [(router, params)]
    if is_token_level(router):
        part = _router_class(router).query_part(params)
        query_level = [part] if part is not None else []
        await token_states(
            session, store, router, params, experts, check_only=check_only, on_fitted=on_fitted, on_step=on_step
        )
    if check_only or (not run_models and any(ROUTERS.get(name).cls.fit_uses_model for name, _ in query_level)):
        return
    for name, part_params in query_level:
        await RoutingService(session, context).fit(name, part_params, experts, on_fitted)


class RouterFitter:
    """The hook CompositionService.create / update call with the checked spec: :func:`fit_router`. The API and
    the admin panel pass the app's context (run_models) and ``defer_slow``: a slow fit (``fit_is_slow``) is
    only checked then, and ``deferred`` says the caller should queue a `fit` job (``queue_fit``). The CLI and
    the demo pass an embedder-only context."""

    def __init__(
        self,
        session: AsyncSession,
        store: ArtifactStore,
        context: RouterContext,
        *,
        run_models: bool = True,
        defer_slow: bool = False,
    ) -> None:
        self.session, self.store, self.context = session, store, context
        self.run_models = run_models
        self.defer_slow = defer_slow
        self.deferred = False

    async def __call__(self, spec: CompositionSpec, experts: list[Expert]) -> None:
        self.deferred = self.defer_slow and fit_is_slow(spec.router, spec.router_params)
        await fit_router(
            self.session,
            self.store,
            self.context,
            spec.router,
            spec.router_params,
            experts,
            run_models=self.run_models,
            check_only=self.deferred,
        )


def router_fitter(
    session: AsyncSession,
    store: ArtifactStore,
    context: RouterContext,
    *,
    run_models: bool = True,
    defer_slow: bool = False,
) -> RouterFitter:
    return RouterFitter(session, store, context, run_models=run_models, defer_slow=defer_slow)


async def queue_fit(session: AsyncSession, composition: str, router: str) -> Job:
    """A `fit` job for ``composition``'s router (``jobs/fit.py`` runs it)."""
    return await JobService(session).submit(JobKind.fit.value, router, {"composition": composition})


# composition id -> (mixture target, adapter experts' slugs); valid while the registry epoch stands still
_MIXTURES = StampedMemo[tuple[Target, list[Expert]]](128)


async def resolve_token_composition(
    session: AsyncSession,
    store: ArtifactStore,
    comp: CompositionView,
    query: str,
    context: RouterContext,
    stamp: Stamp | None = None,
    *,
    max_lora_rank: int = MAX_LORA_RANK,
) -> Plan:
    stamp = stamp if stamp is not None else await registry_stamp(session)
    found = _MIXTURES.get(stamp, (str(store.root), comp.id))
    if found is None:
        experts = await _adapters(session, comp)
        states = await token_states(session, store, comp.router, dict(comp.router_params), experts)
        # every member must be servable (a refusal names it and the fix); the mixture runs on the first one's base
        base, *_ = [target_for(e, store, max_lora_rank=max_lora_rank) for e in experts]
        params = _token_params(comp.router, dict(comp.router_params))
        mixture = TokenMixture(
            composition=comp.name,
            router=comp.router,
            router_params=json.dumps(params, sort_keys=True),
            adapters=tuple((str(e.id), e.slug, store.expert_dir(e.id)) for e in experts),
            states=tuple(states),
            make_router=_router_factory(comp.router, params),
            slot_params=_slot_params(comp.router, params),
        )
        target = Target(base.base_id, base.base_dir, served_name=comp.name, mixture=mixture, **_serving(base))
        found = _MIXTURES.put(stamp, (str(store.root), comp.id), (target, experts))
    target, experts = found
    assert target.mixture is not None
    slugs = target.mixture.slugs
    bias: tuple[float, ...] | None = None
    scores = dict.fromkeys(slugs, 0.0)
    params = target.mixture.params
    extra: dict[str, Any] = {"level": "token", "top_k": (params.get("local_params") or params).get("top_k")}
    part = _query_part(comp)
    if part is not None:
        described = await _describe_query(session, context, part, experts, query)
        scores = {slug: float(described.scores.get(slug, 0.0)) for slug in slugs}
        bias = _router_class(comp.router).query_bias(params, [scores[s] for s in slugs])
        extra["task_description"] = described.extra.get("task_description")
        extra["bias"] = dict(zip(slugs, bias, strict=True))
    decision = RouteDecision(
        router=comp.router,
        experts=[(slug, 1.0 / len(slugs)) for slug in slugs],
        scores=scores,
        reason=f"token-level: every token picks its adapters in every layer among {len(slugs)} (ask for a trace)",
        extra=extra,
    )
    return Plan(comp.name, target, comp.router, tuple(slugs), tuple(decision.weights), decision, router_bias=bias)


_WEIGHTED = StampedMemo[Target](128)


def weighted_mixture(name: str, adapters: tuple[tuple[str, str, Path], ...]) -> TokenMixture:
    """The ``adapters`` (expert id, slug, folder) applied together with weights each request brings."""
    from serving.mixture.route import WEIGHTED, WeightedRouter

    return TokenMixture(
        composition=name,
        router=WEIGHTED,
        router_params="{}",
        adapters=adapters,
        make_router=WeightedRouter,
        slot_params=json.dumps({"kind": "weighted", "request": "weights"}, sort_keys=True),
    )


async def weighted_plan(
    session: AsyncSession,
    store: ArtifactStore,
    comp: CompositionView,
    decision: RouteDecision,
    aggregator: Aggregator,
    stamp: Stamp | None = None,
    *,
    max_lora_rank: int = MAX_LORA_RANK,
) -> Plan:
    """A ``weighted`` composition's plan: one generation on the mixture of all its adapters (one vLLM slot for every
    query), this query's weights from the router's scores of the chosen ones (and the always-on members)."""
    stamp = stamp if stamp is not None else await registry_stamp(session)
    target = _WEIGHTED.get(stamp, (str(store.root), comp.id))
    if target is None:
        experts = await _adapters(session, comp)
        base, *_ = [target_for(e, store, max_lora_rank=max_lora_rank) for e in experts]
        mixture = weighted_mixture(comp.name, tuple((str(e.id), e.slug, store.expert_dir(e.id)) for e in experts))
        target = _WEIGHTED.put(
            stamp,
            (str(store.root), comp.id),
            Target(base.base_id, base.base_dir, served_name=comp.name, mixture=mixture, **_serving(base)),
        )
    assert target.mixture is not None
    chosen = [(slug, float(decision.scores.get(slug, weight))) for slug, weight in decision.experts]
    weights = aggregator.weights(chosen)
    vector = tuple(weights.get(slug, 0.0) for slug in target.mixture.slugs)
    used = [(slug, w) for slug, w in zip(target.mixture.slugs, vector, strict=True) if w != 0.0]
    return Plan(
        comp.name,
        target,
        comp.router,
        tuple(slug for slug, _ in used),
        tuple(round(w, 6) for _, w in used),
        decision,
        aggregator_name=comp.aggregator,
        mixture_weights=vector,
    )


_MERGED = StampedMemo[Target](256)


async def merged_adapters_plan(
    session: AsyncSession,
    store: ArtifactStore,
    model: str,
    merged: tuple[tuple[str, float], ...],
    stamp: Stamp | None = None,
    *,
    max_lora_rank: int = MAX_LORA_RANK,
) -> Plan:
    """A request's own weighted merge (``merged_adapters`` on /v1, as LoRAX's): the adapters it names applied
    together with its weights (``linear``) on ``model``, their base. One slot per set of adapters, whatever the
    weights (the slot's members in id order, so any order of the same set shares it)."""
    stamp = stamp if stamp is not None else await registry_stamp(session)
    base_slug, base = await expert_target(
        session, store, model, param="model", stamp=stamp, max_lora_rank=max_lora_rank
    )
    if base.adapter_id is not None:
        raise ValidationFailed(
            f"with merged_adapters, model names their base model; {model!r} is an adapter", param="model"
        )
    named: dict[str, tuple[str, Path, float]] = {}
    for i, (ref, weight) in enumerate(merged):
        param = f"merged_adapters.ids[{i}]"
        slug, target = await expert_target(session, store, ref, param=param, stamp=stamp, max_lora_rank=max_lora_rank)
        if target.adapter_id is None or target.adapter_dir is None:
            raise ValidationFailed(f"{slug!r} is not a LoRA adapter: merged_adapters names adapters", param=param)
        if target.base_id != base.base_id:
            raise ValidationFailed(f"{slug!r} adapts another base than {base_slug!r}", param=param)
        if target.adapter_id in named:
            raise ValidationFailed(f"{slug!r} is named twice", param=param)
        named[target.adapter_id] = (slug, target.adapter_dir, weight)
    ids = tuple(sorted(named))
    found = _MERGED.get(stamp, (str(store.root), base.base_id, ids))
    if found is None:
        adapters = tuple((i, named[i][0], named[i][1]) for i in ids)
        mixture = weighted_mixture(f"{base_slug}+" + "+".join(slug for _, slug, _ in adapters), adapters)
        found = _MERGED.put(
            stamp,
            (str(store.root), base.base_id, ids),
            Target(base.base_id, base.base_dir, served_name=model, mixture=mixture, **_serving(base)),
        )
    vector = tuple(named[i][2] for i in ids)
    return Plan(
        model,
        found,
        "merged_adapters",
        tuple(named[i][0] for i in ids),
        tuple(round(w, 6) for w in vector),
        mixture_weights=vector,
    )


def _token_params(router: str, params: dict[str, Any]) -> dict[str, Any]:
    """The router's own parameters, defaults filled in (the engine builds the router from these)."""
    import msgspec

    from routers.token import TOKEN_ROUTERS

    return msgspec.to_builtins(TOKEN_ROUTERS.config(router, params))  # type: ignore[no-any-return]


def _slot_params(router: str, params: dict[str, Any]) -> str:
    from routers.token import TOKEN_ROUTERS

    slot = TOKEN_ROUTERS.build(router, params).slot_params()
    return "" if slot is None else json.dumps(slot, sort_keys=True)


def _router_factory(router: str, params: dict[str, Any]) -> Callable[[], TokenRouter]:
    """What the engine calls to build the mixture's router (serving does not import routers)."""
    from routers.token import TOKEN_ROUTERS

    return lambda: TOKEN_ROUTERS.build(router, params)


def _router_class(router: str) -> type[TokenRouter]:
    from routers.token import TOKEN_ROUTERS

    return TOKEN_ROUTERS.get(router).cls


def _query_part(comp: CompositionView) -> tuple[str, dict[str, Any]] | None:
    return _router_class(comp.router).query_part(dict(comp.router_params))


async def _describe_query(
    session: AsyncSession, context: RouterContext, part: tuple[str, dict[str, Any]], experts: list[Expert], query: str
) -> RouteDecision:
    router = ROUTERS.build(part[0], part[1], context)
    candidates = [candidate_of(e, []) for e in experts]
    service = RoutingService(session, context)
    prepared = await service.states.prepared(router, candidates)
    await session.close()  # no connection held while the model writes the description
    return await router.route(query, candidates, prepared, len(candidates))


async def _adapters(session: AsyncSession, comp: CompositionView) -> list[Expert]:
    rows = {
        e.slug: e
        for e in await session.scalars(
            select(Expert).join(CompositionMember).where(CompositionMember.composition_id == comp.id)
        )
    }
    missing = [s for s in comp.declared_experts if s not in rows]
    if missing or not rows:
        raise Conflict(
            f"composition {comp.name!r} names deleted expert(s): {', '.join(missing) or 'all of them'}",
            param="model",
            code="composition_expert_deleted",
        )
    return [rows[s] for s in comp.declared_experts or sorted(rows)]
