"""The playground: a query to a composition, answered as /v1 answers it, shown with the routing decision
(every candidate's score as a bar), each chosen expert's answer and the aggregate."""

from __future__ import annotations

from typing import Any

from litestar import Controller, get, post
from litestar.di import NamedDependency
from litestar.params import FromQuery
from litestar.plugins.htmx import HTMXRequest, HTMXTemplate
from litestar.response import Template
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from aggregators import ExpertAnswer
from api.admin import views
from api.admin.asking import MAX_TOKENS, ask
from api.admin.views import score_bars, trace_grid
from api.schemas import TokenTraceOut
from composition.plan import Answer
from composition.service import CompositionService
from core.errors import MoergeError, ValidationFailed
from core.settings import Settings
from registry.models import Composition
from registry.store import ArtifactStore


def _result(answer: Answer) -> dict[str, Any]:
    plan, decision = answer.plan, answer.plan.decision
    # each chosen expert's own answer (two or more answered), else the one answer
    members = answer.members or (ExpertAnswer(plan.experts[0] if plan.experts else plan.model, 1.0, answer.text),)
    return {
        "bars": score_bars(decision.scores, decision.slugs) if decision else [],
        "reason": decision.reason if decision else "",
        "router": plan.router,
        "fallback": plan.fallback,
        "routed": list(decision.experts) if decision else [],
        # after aggregation: the experts the final answer came from (a vote keeps the winners)
        "answered_by": list(zip(answer.experts, answer.weights, strict=True)),
        "answers": [
            {"expert": a.slug, "weight": a.weight, "part": a.part, "text": a.text, "error": a.error} for a in members
        ],
        "aggregate": answer.text,
        "aggregator": plan.aggregator_name,
        "aggregation": answer.aggregation.reason if answer.aggregation is not None else None,
        "failed": list(answer.failed),
        "trace": trace_grid(TokenTraceOut.of(answer.trace)) if answer.trace else None,
    }


class PlaygroundPage(Controller):
    path = "/admin/playground"

    async def _names(self, db_session: AsyncSession) -> dict[str, Any]:
        """The first PICKER_LIMIT composition names for the choice, and how many there are (past the limit
        the form also takes a typed name)."""
        limit = views.PICKER_LIMIT
        names = list(await db_session.scalars(select(Composition.name).order_by(Composition.name).limit(limit)))
        total = len(names)
        if total == limit:
            total = int(await db_session.scalar(select(func.count()).select_from(Composition)) or 0)
        return {"compositions": names, "compositions_total": total}

    @get("/")
    async def page(
        self,
        db_session: NamedDependency[AsyncSession],
        composition: FromQuery[str | None] = None,
    ) -> Template:
        context = {
            **await self._names(db_session),
            "composition": composition or "",
            "query": "",
            "max_tokens": MAX_TOKENS,
            "result": None,
            "error": None,
        }
        return Template("playground.html", context=context)

    @post("/")
    async def run(
        self,
        request: HTMXRequest,
        db_session: NamedDependency[AsyncSession],
        store: NamedDependency[ArtifactStore],
        settings: NamedDependency[Settings],
    ) -> Template:
        form = await request.form()
        name = str(form.get("composition_typed") or "").strip() or str(form.get("composition") or "")
        query = str(form.get("query") or "")
        max_text = str(form.get("max_tokens") or MAX_TOKENS)
        result, error = None, None
        try:
            if not max_text.isdigit():
                raise ValidationFailed("max tokens must be a whole number", param="max_tokens")
            if not name:
                raise ValidationFailed("pick a composition", param="composition")
            await CompositionService(db_session, store).get(name)  # an expert's name is not a composition
            result = _result(await ask(request, db_session, name, query, int(max_text)))
        except MoergeError as exc:
            error = exc.message
        context = {"result": result, "error": error, "composition": name, "query": query, "max_tokens": max_text}
        if request.htmx:  # the form's hx-post swaps only the result in
            return HTMXTemplate(template_name="fragments/playground_result.html", context=context)
        return Template("playground.html", context={**context, **await self._names(db_session)})
