"""Aggregators: answer extraction, the weighted vote, and the prompts/outputs of the model-based ones."""

from __future__ import annotations

import pytest

from aggregators import AGGREGATORS
from aggregators.base import Aggregation, ExpertAnswer
from aggregators.vote import extract_answer, vote_key, weighted_majority
from core.errors import ValidationFailed
from serving.engine import GenerationFailed


def ans(slug: str, weight: float, text: str = "", error: str | None = None) -> ExpertAnswer:
    return ExpertAnswer(slug=slug, weight=weight, text=text, error=error)


# --- extraction ---


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The answer is 42.", "42"),
        ("\\boxed{7}", "7"),
        ("We add them up: 3 + 4 = 7.\nSo the result is \\boxed{7}.", "7"),
        ("Simplify: $x = \\boxed{\\frac{1}{2}}$", "\\frac{1}{2}"),
        ("Let me think. First 2, then 3.\nAnswer: 5", "5"),
        ("Step 1: find the answer: not yet.\nFinal Answer: **B**.", "B"),
        ("Answer:\n  Paris.", "Paris"),
        ("The final answer is: 3.14. I hope this helps!", "3.14"),
        ("Result: 2024-03-05", "2024-03-05"),
        ("\n\n  Paris is the capital of France.\nIt lies on the Seine.", "Paris is the capital of France"),
    ],
)
def test_extract_auto(text: str, expected: str) -> None:
    assert extract_answer(text, "auto") == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1,000 metres", "1000"),
        ("It costs $1,234.50 in total", "1234.5"),
        ("4.0", "4"),
        ("So 10 - 3 = 7, and doubling gives 14.", "14"),
        ("The temperature fell to -12 degrees.", "-12"),
        ("Result: 2024-03-05", "5"),  # the hyphens of a date are not minus signs
        ("1000000", "1000000"),
        ("no digits here", None),
    ],
)
def test_extract_number(text: str, expected: str | None) -> None:
    assert extract_answer(text, "number") == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("positive", "positive"),
        ("Positive. The review praises the food.", "positive"),
        ("**NEGATIVE**\nThe customer complains.", "negative"),
        ('  \n"Neutral", since both apply', "neutral"),
        ("... ---", None),
    ],
)
def test_extract_label(text: str, expected: str | None) -> None:
    assert extract_answer(text, "label") == expected


def test_extract_line() -> None:
    assert extract_answer("\n  The answer is 42.  \nBecause 6 x 7.", "line") == "The answer is 42"
    assert extract_answer("   \n\t\n", "line") is None
    assert extract_answer("", "auto") is None


def test_extract_unknown_mode() -> None:
    with pytest.raises(ValueError, match="unknown extract mode"):
        extract_answer("42", "regex")


def test_vote_key_compares_numbers_and_ignores_case() -> None:
    assert vote_key("4.0") == vote_key("4") == "4"
    assert vote_key("1,000") == vote_key("1000")
    assert vote_key("Paris  France") == vote_key("paris france")
    assert vote_key("4 apples") != vote_key("4")


# --- weighted majority ---


def test_weighted_majority_by_weight() -> None:
    # two light votes for "a" lose to one heavy vote for "b" when weighted, win when counted
    votes = [("a", 0.2), ("b", 0.5), ("a", 0.2)]
    tally = weighted_majority(votes, weighted=True)
    assert tally.winner == "b"
    assert tally.voters == [1]
    assert tally.scores == pytest.approx({"a": 0.4, "b": 0.5})
    counted = weighted_majority(votes, weighted=False)
    assert counted.winner == "a"
    assert counted.voters == [0, 2]


def test_weighted_majority_tie_broken_by_largest_single_weight() -> None:
    # "a" and "b" both total 0.6, but "b" has the single strongest voter
    tally = weighted_majority([("a", 0.3), ("a", 0.3), ("b", 0.4), ("b", 0.2)])
    assert tally.winner == "b"
    assert tally.voters == [2, 3]


def test_weighted_majority_tie_broken_by_order() -> None:
    assert weighted_majority([("x", 0.5), ("y", 0.5)]).winner == "x"
    assert weighted_majority([("y", 0.5), ("x", 0.5)]).winner == "y"
    # unweighted tie: 1 vote each, then the strongest weight decides before order
    assert weighted_majority([("x", 0.1), ("y", 0.9)], weighted=False).winner == "y"


def test_weighted_majority_needs_votes() -> None:
    with pytest.raises(ValueError):
        weighted_majority([])


# --- vote ---


def test_vote_returns_full_text_of_strongest_agreeing_expert() -> None:
    vote = AGGREGATORS.build("vote", {})
    result = vote.combine(
        "What is 6 x 7?",
        [
            ans("math", 0.3, "6 x 7 = 42.\nThe answer is 42."),
            ans("code", 0.3, "print(6*7) -> 41\nAnswer: 41"),
            ans("chat", 0.35, "Let me see... \\boxed{42.0}"),
        ],
    )
    assert isinstance(result, Aggregation)
    assert result.text == "Let me see... \\boxed{42.0}"  # the whole answer, not only "42"
    assert result.chosen == ["math", "chat"]
    assert result.extra["answer"] == "42.0"
    assert result.extra["failed"] == []
    assert "2 of 3" in result.reason
    assert vote.uses_model is False
    assert vote.max_tokens(256) == 0


def test_vote_skips_failed_answers() -> None:
    vote = AGGREGATORS.build("vote", {"extract": "label"})
    result = vote.combine(
        "Sentiment of: 'great food'",
        [
            ans("a", 0.9, error="server died"),
            ans("b", 0.2, "Negative, sadly."),
            ans("c", 0.3, "positive"),
            ans("d", 0.1, "Positive."),
        ],
    )
    assert result.chosen == ["c", "d"]
    assert result.text == "positive"
    assert result.extra["failed"] == ["a"]
    assert "a" not in result.extra["extracted"]


def test_vote_unweighted_counts_heads() -> None:
    answers = [ans("a", 0.8, "7"), ans("b", 0.1, "8"), ans("c", 0.1, "8.0")]
    weighted = AGGREGATORS.build("vote", {"extract": "number"}).combine("q", answers)
    counted = AGGREGATORS.build("vote", {"extract": "number", "weighted": False}).combine("q", answers)
    assert weighted.chosen == ["a"]
    assert counted.chosen == ["b", "c"]
    assert counted.text == "8"  # b and c tie on weight: the first of them


def test_vote_nothing_extractable_keeps_strongest() -> None:
    vote = AGGREGATORS.build("vote", {"extract": "number"})
    result = vote.combine("q", [ans("a", 0.4, "no idea"), ans("b", 0.6, "cannot say")])
    assert result.text == "cannot say"
    assert result.chosen == ["b"]
    assert "no answer could be extracted" in result.reason


def test_vote_all_failed_raises() -> None:
    vote = AGGREGATORS.build("vote", {})
    with pytest.raises(GenerationFailed, match="every chosen expert failed") as info:
        vote.combine("q", [ans("a", 0.5, error="timeout"), ans("b", 0.5, error="OOM")])
    assert "a: timeout" in str(info.value)
    assert "b: OOM" in str(info.value)
    with pytest.raises(GenerationFailed):
        vote.combine("q", [])


# --- synthesize ---

ANSWERS = [
    ans("math", 0.5, "The answer is 12."),
    ans("broken", 0.3, error="engine crashed"),
    ans("chat", 0.2, "I think it's 13."),
]


def test_synthesize_prompt() -> None:
    agg = AGGREGATORS.build("synthesize", {"model": "judge-7b", "instructions": "Answer in French."})
    assert agg.uses_model is True
    assert agg.model_slug() == "judge-7b"
    messages = agg.prompt("How many months are in a year?", ANSWERS)
    assert [m["role"] for m in messages] == ["system", "user"]
    system, user = messages[0]["content"], messages[1]["content"]
    assert "may be wrong" in system
    assert "Answer in French." in system
    assert "How many months are in a year?" in user
    assert "[1]\nThe answer is 12." in user
    assert "[2]\nI think it's 13." in user
    assert "engine crashed" not in user
    assert "[3]" not in user


def test_synthesize_finish_and_tokens() -> None:
    agg = AGGREGATORS.build("synthesize", {})
    assert agg.model_slug() is None
    assert agg.max_tokens(300) == 300
    assert AGGREGATORS.build("synthesize", {"max_tokens": 64}).max_tokens(300) == 64
    result = agg.finish("q", ANSWERS, "\n  There are 12 months.  \n")
    assert result.text == "There are 12 months."
    assert result.chosen == ["math", "chat"]
    assert result.extra["failed"] == ["broken"]
    empty = agg.finish("q", ANSWERS, "   ")
    assert empty.text == "The answer is 12."
    assert empty.chosen == ["math"]


def test_synthesize_all_failed_raises() -> None:
    agg = AGGREGATORS.build("synthesize", {})
    with pytest.raises(GenerationFailed):
        agg.prompt("q", [ans("a", 1.0, error="down")])


# --- select ---


def test_select_prompt() -> None:
    agg = AGGREGATORS.build("select", {})
    assert agg.max_tokens(1024) == 8
    messages = agg.prompt("How many months are in a year?", ANSWERS)
    system, user = messages[0]["content"], messages[-1]["content"]
    assert "may be wrong" in system
    assert "only the number" in system
    assert "How many months are in a year?" in user
    assert "[1]\nThe answer is 12." in user
    assert "[2]\nI think it's 13." in user
    assert "engine crashed" not in user
    assert "1 to 2" in user


@pytest.mark.parametrize("output", ["2", " 2\n", "Answer 2.", "[2] is best", "2 (the first is wrong)"])
def test_select_finish_valid(output: str) -> None:
    agg = AGGREGATORS.build("select", {})
    result = agg.finish("q", ANSWERS, output)
    # numbering skips the failed answer: 2 is "chat", not "broken"
    assert result.text == "I think it's 13."
    assert result.chosen == ["chat"]
    assert "picked answer 2" in result.reason
    assert result.extra["pick"] == 2


@pytest.mark.parametrize("output", ["3", "0", "-1", "17", "", "the second one", "best: B"])
def test_select_finish_falls_back(output: str) -> None:
    agg = AGGREGATORS.build("select", {})
    result = agg.finish("q", ANSWERS, output)
    assert result.text == "The answer is 12."
    assert result.chosen == ["math"]
    assert "highest-weight" in result.reason
    assert "pick" not in result.extra


# --- configs ---


@pytest.mark.parametrize(
    ("name", "params", "param"),
    [
        ("vote", {"extract": "bogus"}, "aggregator_params.extract"),
        ("vote", {"weighted": "yes"}, "aggregator_params.weighted"),
        ("vote", {"colour": "red"}, "aggregator_params.colour"),
        ("synthesize", {"max_tokens": 0}, "aggregator_params.max_tokens"),
        ("synthesize", {"model": "Not A Slug!"}, "aggregator_params.model"),
        ("synthesize", {"instructions": "   "}, "aggregator_params.instructions"),
        ("synthesize", {"temperature": 0.2}, "aggregator_params.temperature"),
        ("select", {"max_tokens": -3}, "aggregator_params.max_tokens"),
        ("select", {"max_tokens": None}, "aggregator_params.max_tokens"),
        ("select", {"instructions": "x"}, "aggregator_params.instructions"),
    ],
)
def test_config_errors(name: str, params: dict[str, object], param: str) -> None:
    with pytest.raises(ValidationFailed) as info:
        AGGREGATORS.build(name, params)
    assert info.value.param == param


def test_registry_contents_and_digest() -> None:
    assert {"vote", "synthesize", "select"} <= set(AGGREGATORS.names())
    a = AGGREGATORS.config("vote", {"extract": "number"})
    b = AGGREGATORS.config("vote", {"extract": "number", "weighted": True})
    c = AGGREGATORS.config("vote", {"extract": "label"})
    assert a.digest() == b.digest() != c.digest()


def test_a_structured_vote_compares_parsed_json_whatever_its_layout() -> None:
    vote = AGGREGATORS.build("vote", {"extract": "auto"}).for_structured()
    answers = [
        ExpertAnswer("a", 0.2, '{"size": "small", "rank": 3}'),
        ExpertAnswer("b", 0.3, '{"rank":3,"size":"small"}'),  # the same object, laid out otherwise
        ExpertAnswer("c", 0.45, '{"size": "large", "rank": 3}'),
        ExpertAnswer("d", 0.9, "not json at all"),  # does not parse: no vote
    ]
    result = vote.combine("q", answers)
    assert sorted(result.chosen) == ["a", "b"]  # 0.5 against 0.45; d abstains
    assert result.text == '{"rank":3,"size":"small"}'  # the strongest agreeing expert's own text
    # the configured extraction (auto reads the first line) would have counted d's text as an answer
    assert AGGREGATORS.build("vote", {}).combine("q", answers).chosen == ["d"]


def test_a_structured_vote_compares_tool_calls_by_name_and_parsed_arguments() -> None:
    def call(name: str, arguments: str, call_id: str) -> dict[str, object]:
        return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}

    vote = AGGREGATORS.build("vote", {}).for_structured()
    answers = [
        ExpertAnswer("a", 0.3, "", tool_calls=(call("get_time", '{"zone": "utc"}', "call_a"),)),
        ExpertAnswer("b", 0.35, "", tool_calls=(call("get_time", '{ "zone":"utc" }', "call_b"),)),
        ExpertAnswer("c", 0.5, "", tool_calls=(call("get_weather", '{"zone": "utc"}', "call_c"),)),
        ExpertAnswer("d", 0.9, "", tool_calls=(call("get_time", "{broken", "call_d"),)),
    ]
    result = vote.combine("q", answers)
    assert sorted(result.chosen) == ["a", "b"]
    assert result.tool_calls == answers[1].tool_calls  # the strongest agreeing expert's calls, whole
