"""What a plan can honour of a request's OpenAI options, checked before anything runs: log-probabilities, several
answers (``n``) and an echoed prompt's log-probabilities belong to ONE generation, so a composition that combines
several experts' answers refuses them (saying why); JSON answers and tool calls reach every member, and an
aggregator keeps them only if it compares parsed answers (``vote``) or writes the answer itself in the format
asked (``synthesize``, not with tools); and each generation's engine must support what it is asked for."""

from __future__ import annotations

from composition.plan import Plan, Query
from core.errors import ValidationFailed
from serving.dispatch import answering_capabilities, answering_engine
from serving.engine import Engine, Target


def check_supported(engine: Engine, plan: Plan, query: Query) -> None:
    """ValidationFailed (a 400 naming the field) for an option ``plan`` cannot honour."""
    sampling, guidance = query.sampling, query.guidance
    aggregator = plan.aggregator
    fused = aggregator is not None and aggregator.fuses_logits
    if plan.composite and not fused:
        assert aggregator is not None
        why = (
            f"{plan.model!r} combines the answers of {len(plan.members)} experts with {plan.aggregator_name!r}, "
            "and {what} belong to one generation: ask one expert, or a composition that answers with one generation "
            "(k = 1, a token-level or weighted mixture)"
        )
        if sampling.logprobs is not None:
            raise ValidationFailed(why.format(what="log-probabilities"), param="logprobs")
        if sampling.n > 1:
            raise ValidationFailed(why.format(what="several answers (n)"), param="n")
        if guidance is not None and guidance.calls_tools and not aggregator.compares_structured:
            raise ValidationFailed(
                f"{plan.model!r} aggregates with {plan.aggregator_name!r}, which reads or writes text; tool calls are "
                "compared by `vote` only (or ask a composition with k = 1)",
                param="tools",
            )
        targets = [m.target for m in plan.members]
        if plan.aggregator_target is not None and aggregator.uses_model:
            targets.append(plan.aggregator_target)
        echo = False  # the composition echoes the prompt itself, before the aggregate
    else:
        targets, echo = [plan.target], query.sampling.echo
    for target in targets:
        _check_engine(engine, plan, query, target, fused=fused, echo=echo)


def _check_engine(engine: Engine, plan: Plan, query: Query, target: Target, *, fused: bool, echo: bool) -> None:
    capabilities = answering_capabilities(engine, target, fused=fused)
    guidance = query.guidance
    asked = []
    if (
        guidance is not None
        and (guidance.response_format is not None or guidance.calls_tools)
        and not capabilities.guidance
    ):
        field = "response_format" if guidance.response_format is not None else "tools"
        asked.append((field, "JSON answers and tool calls"))
    if (query.sampling.logprobs is not None or echo) and not capabilities.logprobs:
        asked.append(("logprobs" if query.sampling.logprobs is not None else "echo", "log-probabilities and echo"))
    if query.sampling.n > 1 and not capabilities.choices:
        asked.append(("n", "several answers (n > 1)"))
    if asked:
        field, what = asked[0]
        name = answering_engine(engine, target, fused=fused)
        role = (
            "logit fusion"
            if fused
            else "a token-level mixture vLLM cannot run as a slot here"
            if target.mixture
            else "its model"
        )
        raise ValidationFailed(
            f"{plan.model!r} is answered by the {name} engine ({role}), which does not support {what}",
            param=field,
        )
