"""The `two_step`, `skills`, `kshot` and `instruct` global routers on the real all-MiniLM-L6-v2 embedder.

Where a router needs a language model (`kshot`, `instruct`), a plain async function stands in for it: the
fake model answers by a fixed rule, since the router's logic, not the model, is under test.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import pytest

from core.errors import ValidationFailed
from routers.query.base import ROUTERS, Candidate, GlobalRouter, RouteDecision, RouterContext
from routers.query.embedder import SentenceEmbedder, shared_embedder
from routers.query.instruct import InstructRouter
from routers.query.kshot import KShotRouter, greedy_pick, normalize_answer
from routers.query.skills import SkillsRouter, assignments_of, group_by_expert, skill_profile
from routers.query.two_step import TwoStepRouter

MATH = Candidate(
    id="1",
    slug="math",
    description="Adds, subtracts and multiplies numbers.",
    task_description="Solve a two-number arithmetic problem and give the number.",
    skills=("arithmetic", "math"),
    domains=("numbers",),
    example_prompts=("What is 12 + 7?", "Compute 45 - 18.", "What is 6 times 9?", "Calculate 230 + 415."),
    evals=(("arithmetic", "exact_match", 0.9),),
)
DATES = Candidate(
    id="2",
    slug="dates",
    description="Normalizes dates.",
    task_description="Convert a date written in words to ISO 8601 format (YYYY-MM-DD).",
    skills=("date normalization",),
    domains=("calendar",),
    example_prompts=(
        "Convert 3 March 2021 to ISO format.",
        "Write July 4, 1999 as YYYY-MM-DD.",
        "Give the ISO date for the 21st of December 2012.",
        "Normalize the date 'Jan 5 2020' to ISO 8601.",
    ),
    evals=(("date_normalization", "exact_match", 1.0), ("arithmetic", "exact_match", 0.1)),
)
SENTIMENT = Candidate(
    id="3",
    slug="sentiment",
    description="Labels the sentiment of a review.",
    task_description="Classify the sentiment of a text as positive or negative.",
    skills=("sentiment",),
    domains=("reviews",),
    example_prompts=(
        "Is this review positive or negative? 'The film was a delight.'",
        "Sentiment of: 'Terrible service, never again.'",
        "Label the sentiment: 'I love this phone.'",
        "Positive or negative: 'The food was cold and bland.'",
    ),
    evals=(("sentiment", "exact_match", 0.8),),
)
EXPERTS = [MATH, DATES, SENTIMENT]


@pytest.fixture(scope="module")
def embedder() -> Iterator[SentenceEmbedder]:
    # One torch thread: with the two cores busy (a training job), two threads made each encode ~30x slower.
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield shared_embedder()
    finally:
        torch.set_num_threads(threads)


async def build(
    name: str, params: dict[str, Any], context: RouterContext, candidates: Sequence[Candidate]
) -> tuple[GlobalRouter, Any]:
    router = ROUTERS.build(name, params, context)
    states = [await router.fit_expert(c) for c in candidates]
    return router, router.prepare(candidates, states)


def assert_well_formed(decision: RouteDecision, candidates: Sequence[Candidate]) -> None:
    assert set(decision.scores) == {c.slug for c in candidates}
    assert decision.reason.strip() and "\n" not in decision.reason
    if decision.experts:
        assert abs(sum(decision.weights) - 1.0) < 1e-4
        assert not decision.fallback


def config_error(name: str, params: dict[str, Any]) -> ValidationFailed:
    with pytest.raises(ValidationFailed) as info:
        ROUTERS.config(name, params)
    return info.value


def test_all_four_are_registered() -> None:
    for name in ("two_step", "skills", "kshot", "instruct"):
        assert name in ROUTERS and ROUTERS.get(name).help


# -- two_step ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("query", "winner"),
    [
        ("What is 38 + 4?", "math"),
        ("Convert 9 August 2015 to ISO format.", "dates"),
        ("Is this review positive or negative? 'Awful plot, wooden acting.'", "sentiment"),
    ],
)
async def test_two_step_classifies_to_the_right_expert(embedder: SentenceEmbedder, query: str, winner: str) -> None:
    router, prepared = await build("two_step", {}, RouterContext(embedder), EXPERTS)
    decision = await router.route(query, EXPERTS, prepared, 1)
    assert_well_formed(decision, EXPERTS)
    assert decision.slugs == [winner], decision.reason
    assert decision.scores[winner] == max(decision.scores.values()) >= 0.5
    assert decision.extra["category"] == winner and "confidence" in decision.reason
    assert abs(sum(decision.scores.values()) - 1.0) < 1e-4  # one expert per category: the probabilities


async def test_two_step_category_table_maps_one_category_to_several_experts(embedder: SentenceEmbedder) -> None:
    math2 = Candidate(id="4", slug="math-large", skills=("arithmetic",), example_prompts=("What is 81 - 17?",))
    candidates = [*EXPERTS, math2]
    router, prepared = await build("two_step", {"category_field": "skills"}, RouterContext(embedder), candidates)
    decision = await router.route("What is 15 + 27?", candidates, prepared, 2)
    assert_well_formed(decision, candidates)
    assert decision.extra["category"] == "arithmetic"
    assert sorted(decision.slugs) == ["math", "math-large"]
    assert decision.scores["math"] == decision.scores["math-large"]
    assert decision.weights == [0.5, 0.5]


async def test_two_step_low_confidence_falls_back(embedder: SentenceEmbedder) -> None:
    router, prepared = await build("two_step", {"min_confidence": 0.99}, RouterContext(embedder), EXPERTS)
    decision = await router.route("Tell me a story about a dragon.", EXPERTS, prepared, 1)
    assert decision.fallback and decision.experts == []
    assert set(decision.scores) == {"math", "dates", "sentiment"}
    assert "below min_confidence 0.99" in decision.reason and "confidence 0." in decision.reason


async def test_two_step_single_category_has_full_confidence(embedder: SentenceEmbedder) -> None:
    router, prepared = await build("two_step", {"min_confidence": 1.0}, RouterContext(embedder), [MATH])
    decision = await router.route("Convert 3 May 2001 to ISO format.", [MATH], prepared, 1)
    assert decision.slugs == ["math"] and decision.scores == {"math": 1.0}
    assert decision.extra["confidence"] == 1.0


async def test_two_step_is_deterministic(embedder: SentenceEmbedder) -> None:
    first = [await build("two_step", {}, RouterContext(embedder), EXPERTS) for _ in range(2)]
    decisions = [await r.route("Write 1 June 2030 as YYYY-MM-DD", EXPERTS, p, 2) for r, p in first]
    assert decisions[0].as_dict() == decisions[1].as_dict()


def test_two_step_config_errors_name_the_field() -> None:
    assert config_error("two_step", {"min_confidence": 1.5}).param == "router_params.min_confidence"
    assert config_error("two_step", {"regularization": 0}).param == "router_params.regularization"
    assert config_error("two_step", {"category_field": "tags"}).param == "router_params.category_field"
    assert config_error("two_step", {"min_confidance": 0.5}).param == "router_params.min_confidance"


# -- skills -----------------------------------------------------------------------------------------


def test_skill_profile_is_plus_one_right_minus_one_wrong_normalized() -> None:
    profile = skill_profile(DATES)
    # every evaluation credits the expert's listed skill and the task itself
    assert profile["date_normalization"] == pytest.approx(1.0)
    assert profile["arithmetic"] == pytest.approx(-0.8)
    assert profile["date normalization"] == pytest.approx((1.0 - 0.8) / 2)
    assert skill_profile(Candidate(id="x", slug="x", skills=("a",))) == {}


@pytest.mark.parametrize(
    ("query", "winner"),
    [
        ("What is 301 + 58?", "math"),
        ("Convert 14 February 2019 to ISO 8601.", "dates"),
        ("Positive or negative: 'What a wonderful concert.'", "sentiment"),
    ],
)
async def test_skills_recruits_the_expert_with_the_skill(embedder: SentenceEmbedder, query: str, winner: str) -> None:
    router, prepared = await build("skills", {}, RouterContext(embedder), EXPERTS)
    decision = await router.route(query, EXPERTS, prepared, 1)
    assert_well_formed(decision, EXPERTS)
    assert decision.slugs == [winner], decision.reason
    assert decision.scores[winner] == max(decision.scores.values()) > 0
    inferred = list(decision.extra["query_skills"])
    assert 1 <= len(inferred) <= 2 and inferred[0] in {c.slug: c for c in EXPERTS}[winner].skills


async def test_skills_profile_outweighs_a_declared_skill(embedder: SentenceEmbedder) -> None:
    """Both list arithmetic; the one whose evaluations show it gets it right is recruited first."""
    weak = Candidate(
        id="5",
        slug="weak-math",
        skills=("arithmetic",),
        example_prompts=("What is 3 + 4?",),
        evals=(("arithmetic", "exact_match", 0.05),),
    )
    candidates = [weak, MATH, DATES]
    router, prepared = await build("skills", {"query_skills": 1}, RouterContext(embedder), candidates)
    decision = await router.route("What is 17 + 26?", candidates, prepared, 2)
    assert list(decision.extra["query_skills"]) == ["arithmetic"]
    assert decision.slugs == ["math", "weak-math"]
    assert decision.scores["math"] > decision.scores["weak-math"] > 0 > decision.scores["dates"]


async def test_skills_falls_back_when_nobody_is_good_at_it(embedder: SentenceEmbedder) -> None:
    bad = Candidate(
        id="6",
        slug="bad",
        skills=("arithmetic",),
        example_prompts=("What is 5 + 8?",),
        evals=(("arithmetic", "exact_match", 0.0),) * 2,
    )  # profile -1 cancels the declared-skill prior
    router, prepared = await build("skills", {"query_skills": 1}, RouterContext(embedder), [bad])
    decision = await router.route("What is 2 + 2?", [bad], prepared, 1)
    assert decision.fallback and decision.experts == [] and decision.scores == {"bad": 0.0}
    assert "no expert has a score above 0.0" in decision.reason


async def test_skills_unrelated_query_infers_no_skill(embedder: SentenceEmbedder) -> None:
    router, prepared = await build("skills", {}, RouterContext(embedder), EXPERTS)
    decision = await router.route("Tell me a story about a dragon.", EXPERTS, prepared, 2)
    assert decision.fallback and decision.experts == [] and decision.extra["query_skills"] == {}
    assert decision.scores == {"math": 0.0, "dates": 0.0, "sentiment": 0.0}
    assert "resembles no known skill" in decision.reason
    # with no similarity floor the best-matching skill is still inferred
    router, prepared = await build("skills", {"min_similarity": -1.0}, RouterContext(embedder), EXPERTS)
    assert not (await router.route("Tell me a story about a dragon.", EXPERTS, prepared, 2)).fallback


def test_group_by_expert_runs_each_expert_once() -> None:
    assignments = [(0, "math"), (1, "dates"), (2, "math"), (0, "sentiment"), (3, "dates"), (2, "math")]
    assert group_by_expert(assignments) == {"math": [0, 2], "dates": [1, 3], "sentiment": [0]}
    assert group_by_expert([]) == {}
    decisions = [
        RouteDecision("skills", [("math", 0.6), ("dates", 0.4)], {}, "r"),
        RouteDecision("skills", [], {}, "r", True),
        RouteDecision("skills", [("dates", 1.0)], {}, "r"),
    ]
    assert group_by_expert(assignments_of(decisions)) == {"math": [0], "dates": [0, 2]}


def test_skills_config_errors_name_the_field() -> None:
    assert config_error("skills", {"query_skills": 0}).param == "router_params.query_skills"
    assert config_error("skills", {"min_score": -1.0}).param == "router_params.min_score"
    assert config_error("skills", {"min_similarity": 1.5}).param == "router_params.min_similarity"
    assert config_error("skills", {"query_skills": "two"}).param == "router_params.query_skills"


# -- kshot ------------------------------------------------------------------------------------------

KSHOT_EXAMPLES = [
    {"prompt": "What is 2 + 3?", "answer": "5"},
    {"prompt": "What is 10 + 7?", "answer": "17"},
    {"prompt": "What is 4 + 4?", "answer": "8"},
    {"prompt": "What is 20 + 22?", "answer": "42"},
    {"prompt": "What is 1 + 1?", "answer": "2"},
]


def fake_model_calls() -> tuple[Any, list[str]]:
    """A fake model standing in for the serving engine: answers by expert slug, and logs who was asked."""
    calls: list[str] = []

    async def fake_model(slug: str, messages: list[dict[str, str]], max_new_tokens: int) -> str:
        calls.append(slug)
        a, b = (int(x) for x in re.findall(r"\d+", messages[-1]["content"]))
        if slug == "math":  # right on every example, with trailing chatter on a second line
            return f" {a + b}\nHope that helps!"
        if slug == "small-sums":  # right only when the sum is below 10
            return str(a + b) if a + b < 10 else str(a + b + 1)
        if slug == "big-sums":  # right only when the sum is 10 or more
            return str(a + b) if a + b >= 10 else "0"
        return "I think it is 3"  # the blind guesser: never right on these examples

    return fake_model, calls


def kshot_candidates(*slugs: str) -> list[Candidate]:
    return [Candidate(id=str(i), slug=s) for i, s in enumerate(slugs)]


async def test_kshot_grades_exact_match_and_leaves_out_blind_guessers(embedder: SentenceEmbedder) -> None:
    fake_model, calls = fake_model_calls()
    candidates = kshot_candidates("guesser", "math", "small-sums")
    context = RouterContext(embedder, generate=fake_model)
    router, prepared = await build("kshot", {"examples": KSHOT_EXAMPLES}, context, candidates)
    assert calls.count("math") == 5 and calls.count("guesser") == 5
    assert prepared["math"]["correct"] == [True] * 5
    assert prepared["small-sums"]["correct"] == [True, False, True, False, True]
    assert prepared["guesser"]["solved"] == 0
    decision = await router.route("anything at all", candidates, prepared, 3)
    assert_well_formed(decision, candidates)
    assert decision.scores == {"guesser": 0.0, "math": 1.0, "small-sums": 0.6}
    assert decision.slugs == ["math", "small-sums"]  # the guesser is never chosen, even with room for it
    assert decision.extra["blind_guessers"] == ["guesser"]
    assert "math 1.00" in decision.reason and "small-sums 0.60" in decision.reason
    assert decision.weights == pytest.approx([1 / 1.6, 0.6 / 1.6], abs=1e-5)
    # the query does not change a k-shot choice
    other = await router.route("Translate 'cat' into French.", candidates, prepared, 3)
    assert other.as_dict() == decision.as_dict()


async def test_kshot_diversity_picks_a_complementary_expert(embedder: SentenceEmbedder) -> None:
    """small-sums solves 3/5 (sums < 10); a near copy of it solves the same 3; big-sums solves the other 2."""
    fake_model, _ = fake_model_calls()

    async def fake_model_with_copy(slug: str, messages: list[dict[str, str]], max_new_tokens: int) -> str:
        return await fake_model("small-sums" if slug == "small-sums-copy" else slug, messages, max_new_tokens)

    candidates = kshot_candidates("small-sums", "small-sums-copy", "big-sums")
    context = RouterContext(embedder, generate=fake_model_with_copy)
    diverse, prepared = await build("kshot", {"examples": KSHOT_EXAMPLES, "diversity": 0.5}, context, candidates)
    decision = await diverse.route("q", candidates, prepared, 2)
    assert decision.slugs == ["small-sums", "big-sums"], decision.reason
    assert decision.extra["coverage"] == 1.0
    # without the diversity bonus the more accurate copy wins the second seat
    plain, prepared = await build("kshot", {"examples": KSHOT_EXAMPLES, "diversity": 0.0}, context, candidates)
    assert (await plain.route("q", candidates, prepared, 2)).slugs == ["small-sums", "small-sums-copy"]


async def test_kshot_all_guessers_fall_back(embedder: SentenceEmbedder) -> None:
    fake_model, _ = fake_model_calls()
    candidates = kshot_candidates("guesser")
    router, prepared = await build(
        "kshot", {"examples": KSHOT_EXAMPLES}, RouterContext(embedder, fake_model), candidates
    )
    decision = await router.route("q", candidates, prepared, 1)
    assert decision.fallback and decision.scores == {"guesser": 0.0}
    assert "no expert solves at least 1 of the 5 examples" in decision.reason


async def test_kshot_needs_a_model(embedder: SentenceEmbedder) -> None:
    router = ROUTERS.build("kshot", {"examples": KSHOT_EXAMPLES}, RouterContext(embedder))
    with pytest.raises(ValidationFailed) as info:
        await router.fit_expert(MATH)
    assert info.value.param == "router"


def test_kshot_helpers() -> None:
    assert normalize_answer("  \n Paris \nFrance") == "paris"
    solved = {"a": [True, True, False, False], "b": [True, True, False, False], "c": [False, False, True, True]}
    assert [s for s, _ in greedy_pick(solved, 2, 0.0, ["a", "b", "c"])] == ["a", "b"]
    assert [s for s, _ in greedy_pick(solved, 2, 1.0, ["a", "b", "c"])] == ["a", "c"]
    assert [s for s, _ in greedy_pick(solved, 5, 1.0, ["b", "a", "c"])] == ["b", "c", "a"]


def test_kshot_config_errors_name_the_field() -> None:
    assert config_error("kshot", {}).param == "router_params.examples"
    assert config_error("kshot", {"examples": [KSHOT_EXAMPLES[0]] * 65}).param == "router_params.examples"
    bad_answer = [KSHOT_EXAMPLES[0], {"prompt": "p", "answer": "  "}]
    assert config_error("kshot", {"examples": bad_answer}).param == "router_params.examples[1].answer"
    assert config_error("kshot", {"examples": [{"prompt": "p"}]}).param == "router_params.examples[0].answer"
    params = {"examples": KSHOT_EXAMPLES}
    assert config_error("kshot", {**params, "diversity": 1.2}).param == "router_params.diversity"
    assert config_error("kshot", {**params, "max_new_tokens": 0}).param == "router_params.max_new_tokens"
    assert config_error("kshot", {**params, "min_solved": 6}).param == "router_params.min_solved"
    assert ROUTERS.config("kshot", params).digest() != ROUTERS.config("kshot", {**params, "diversity": 0.1}).digest()


# -- instruct ---------------------------------------------------------------------------------------


def fake_describer(description: str) -> tuple[Any, list[tuple[str, str, int]]]:
    """A fake model standing in for the LLM that describes the task: always the same sentence."""
    calls: list[tuple[str, str, int]] = []

    async def fake_model(slug: str, messages: list[dict[str, str]], max_new_tokens: int) -> str:
        calls.append((slug, messages[-1]["content"], max_new_tokens))
        return description

    return fake_model, calls


@pytest.mark.parametrize(
    ("description", "winner"),
    [
        ("Task: Convert a written date into the ISO 8601 YYYY-MM-DD format.\nSure!", "dates"),
        ("Classify whether a movie review expresses positive or negative sentiment.", "sentiment"),
        ("Add two numbers and report the result.", "math"),
    ],
)
async def test_instruct_matches_the_generated_description(
    embedder: SentenceEmbedder, description: str, winner: str
) -> None:
    fake_model, calls = fake_describer(description)
    context = RouterContext(embedder, generate=fake_model, default_model="base-llm")
    router, prepared = await build("instruct", {"max_new_tokens": 20}, context, EXPERTS)
    decision = await router.route("some query 'in quotes'", EXPERTS, prepared, 1)
    assert_well_formed(decision, EXPERTS)
    assert decision.slugs == [winner], decision.reason
    assert decision.scores[winner] == max(decision.scores.values())
    first_line = description.splitlines()[0].removeprefix("Task: ")
    assert decision.extra["task_description"] == first_line
    assert len(calls) == 1 and calls[0][0] == "base-llm" and calls[0][2] == 20
    assert "describe the task" in calls[0][1] and "some query 'in quotes'" in calls[0][1]


async def test_instruct_uses_the_configured_model_and_falls_back_below_threshold(embedder: SentenceEmbedder) -> None:
    fake_model, calls = fake_describer("Write a poem about the sea.")
    context = RouterContext(embedder, generate=fake_model, default_model="base-llm")
    router, prepared = await build("instruct", {"model": "judge", "threshold": 0.6}, context, EXPERTS)
    decision = await router.route("A poem please", EXPERTS, prepared, 2)
    assert calls[0][0] == "judge"
    assert decision.fallback and decision.experts == []
    assert set(decision.scores) == {"math", "dates", "sentiment"} and max(decision.scores.values()) < 0.6
    assert "threshold 0.6" in decision.reason
    assert decision.extra["task_description"] == "Write a poem about the sea."


async def test_instruct_without_a_model_names_the_field(embedder: SentenceEmbedder) -> None:
    fake_model, _ = fake_describer("x")
    router, prepared = await build("instruct", {}, RouterContext(embedder, generate=fake_model), EXPERTS)
    with pytest.raises(ValidationFailed) as info:
        await router.route("q", EXPERTS, prepared, 1)
    assert info.value.param == "router_params.model"


def test_instruct_config_errors_name_the_field() -> None:
    assert config_error("instruct", {"threshold": 2}).param == "router_params.threshold"
    assert config_error("instruct", {"temperature": 0}).param == "router_params.temperature"
    assert config_error("instruct", {"max_new_tokens": 1000}).param == "router_params.max_new_tokens"
    assert config_error("instruct", {"model": " "}).param == "router_params.model"


def test_router_classes_are_the_registered_ones() -> None:
    assert ROUTERS.get("two_step").cls is TwoStepRouter and ROUTERS.get("skills").cls is SkillsRouter
    assert ROUTERS.get("kshot").cls is KShotRouter and ROUTERS.get("instruct").cls is InstructRouter


def test_per_expert_scores_mean_of_top_rows_with_and_without_padding() -> None:
    from routers.query.embedding import per_expert_scores

    sim = np.array([0.9, 0.1, 0.5, 0.3, 0.8, 0.7], dtype=np.float32)  # 2 experts x 3 rows
    full = np.ones((2, 3), dtype=bool)
    np.testing.assert_allclose(per_expert_scores(sim, full, 2), [0.7, 0.75], atol=1e-6)
    np.testing.assert_allclose(per_expert_scores(sim, full, 1), [0.9, 0.8], atol=1e-6)
    padded = np.array([[True, True, True], [True, False, False]])  # expert 2 has one row: its padding ignored
    np.testing.assert_allclose(per_expert_scores(sim, padded, 2), [0.7, 0.3], atol=1e-6)
