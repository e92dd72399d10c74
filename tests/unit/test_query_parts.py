"""Decomposition of multi-part queries (routers/query/parts.py) and the synthesize prompt for parts."""

from __future__ import annotations

from pathlib import Path

from aggregators import ExpertAnswer
from aggregators.synthesize import PARTS_SYSTEM, Synthesize, SynthesizeConfig
from composition.plan import Query
from routers.query.base import RouteDecision
from routers.query.parts import MAX_PARTS, merge_part_decisions, part_routes, split_parts
from serving.engine import Sampling, Target


def test_split_numbered_parts_with_continuation_lines() -> None:
    query = "Answer both, one per line.\n1. What is 16 + 81?\n2) Classify this review:\n  'Great food.'\n"
    assert split_parts(query) == ["What is 16 + 81?", "Classify this review:\n'Great food.'"]


def test_no_split_without_two_consecutive_parts() -> None:
    assert split_parts("What is 16 + 81?") == []
    assert split_parts("1. only one part") == []
    assert split_parts("2. starts at two\n3. then three") == []
    # a later number out of sequence is text of the current part, not a new part
    assert split_parts("1. first\n3. not second\n2. second") == ["first\n3. not second", "second"]
    many = "\n".join(f"{n}. question {n}" for n in range(1, MAX_PARTS + 2))
    assert split_parts(many) == []  # a long numbered list is one task, answered whole


def _decision(best: str | None, scores: dict[str, float]) -> RouteDecision:
    if best is None:
        return RouteDecision("embedding", [], scores, "nothing fits", fallback=True)
    return RouteDecision("embedding", [(best, 1.0)], scores, f"{best} fits")


def test_merge_part_decisions() -> None:
    merged = merge_part_decisions(
        "embedding",
        ["p1", "p2", "p3"],
        [
            _decision("math", {"math": 0.9, "dates": 0.1}),
            _decision("dates", {"math": 0.2, "dates": 0.8}),
            _decision("math", {"math": 0.7, "dates": 0.3}),
        ],
    )
    assert merged.experts == [("math", round(2 / 3, 6)), ("dates", round(1 / 3, 6))]
    assert merged.scores == {"math": 0.9, "dates": 0.8}  # each candidate's best over the parts
    assert not merged.fallback and "part 2 -> dates" in merged.reason
    assert [(r.text, r.expert) for r in part_routes(merged)] == [("p1", "math"), ("p2", "dates"), ("p3", "math")]

    unfit = merge_part_decisions("embedding", ["p1", "p2"], [_decision(None, {"m": 0.1}), _decision("m", {"m": 0.9})])
    assert [r.expert for r in part_routes(unfit)] == [None, "m"] and not unfit.fallback
    none = merge_part_decisions("embedding", ["p1", "p2"], [_decision(None, {"m": 0.1})] * 2)
    assert none.fallback and none.experts == []
    assert part_routes(RouteDecision("embedding", [("m", 1.0)], {"m": 1.0}, "whole")) == []


def test_asking_replaces_only_the_user_query() -> None:
    target = Target(base_id="b", base_dir=Path("."))
    chat = Query(
        "m",
        Sampling(),
        messages=[
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "1. a\n2. b"},
            {"role": "assistant", "content": "?"},
            {"role": "user", "content": "1. a\n2. b"},
        ],
    )
    assert chat.on_part(target, "a").messages == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "a"},
    ]
    completion = Query("m", Sampling(), prompt="1. a\n2. b")
    assert completion.on_part(target, "b").prompt == "b" and completion.prompt == "1. a\n2. b"


def test_synthesize_prompt_lists_each_part_with_its_answer() -> None:
    agg = Synthesize(SynthesizeConfig(model="base"))
    answers = [
        ExpertAnswer("math", 0.5, "97", part="What is 16 + 81?"),
        ExpertAnswer("sent", 0.5, error="server died", part="Sentiment of 'meh'?"),
    ]
    system, user = agg.prompt("1. What is 16 + 81?\n2. Sentiment of 'meh'?", answers)
    assert system["content"] == PARTS_SYSTEM
    assert user["content"].startswith("1. What is 16 + 81?\n2. Sentiment of 'meh'?\n\n")
    assert "each part:\n1. 97\n2. (no answer)\n" in user["content"]
    # an empty synthesis falls back to the parts' answers, one per line
    assert agg.finish("q", [answers[0], ExpertAnswer("sent", 0.5, "neutral", part="p2")], " ").text == "97\nneutral"
    # without parts, the usual candidates prompt
    _, plain = agg.prompt("q", [ExpertAnswer("a", 0.5, "x"), ExpertAnswer("b", 0.5, "y")])
    assert "Candidate answers" in plain["content"]


def test_top_k_of_array_keeps_declared_order_on_ties_and_names_the_best_on_fallback() -> None:
    import numpy as np

    from routers.query.base import top_k_decision, top_k_of_array

    slugs = ["a", "b", "c", "d"]
    scores = np.array([0.5, 0.9, 0.9, 0.1])
    two = top_k_of_array("r", slugs, scores, 2, threshold=0.2, temperature=0.05, reason="why")
    assert two.slugs == ["b", "c"] and two.weights == [0.5, 0.5]  # tie: declared order, equal weights
    one = top_k_of_array("r", slugs, scores, 1, threshold=None, temperature=0.05, reason="why")
    assert one.slugs == ["b"] and one.weights == [1.0]
    many = top_k_of_array("r", slugs, scores, 4, threshold=0.4, temperature=1.0, reason="why")
    assert many.slugs == ["b", "c", "a"]  # only three reach the threshold
    assert abs(sum(many.weights) - 1.0) < 1e-5 and many.weights[0] > many.weights[2]
    none = top_k_of_array("r", slugs, scores, 1, threshold=0.95, temperature=0.05, reason="why")
    assert none.fallback and none.experts == [] and "best: b at 0.900" in none.reason
    assert none.scores == {"a": 0.5, "b": 0.9, "c": 0.9, "d": 0.1}  # every candidate's score
    as_dict = top_k_decision(
        "r", dict(zip(slugs, scores.tolist(), strict=True)), 2, threshold=0.2, temperature=0.05, reason="why"
    )
    assert as_dict == two
