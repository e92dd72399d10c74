"""The synthetic skill tasks: disjoint, deterministic splits; graders; the task registry."""

from __future__ import annotations

import itertools
import operator
import random
import re

import pytest

from evals.tasks import SPLITS, TASKS, Example, Task, TaskRegistry, chat_messages, get_task, split_of
from evals.tasks.arithmetic import ArithmeticTask

ALL = pytest.mark.parametrize("task", list(TASKS), ids=lambda t: t.name)


def test_registry_holds_at_least_six_tasks_with_router_metadata() -> None:
    assert len(TASKS) >= 6
    assert {"arithmetic", "dates", "json_extract", "list_sort", "sentiment", "units"} <= set(TASKS.names())
    for task in TASKS:
        assert task.description.endswith(".") and task.skills and task.domains
        assert len(task.example_prompts) == 3
        assert len(set(task.example_prompts)) == 3
    assert get_task("dates") is TASKS.get("dates")


@ALL
def test_splits_are_disjoint(task: Task) -> None:
    splits = {split: task.examples(split, 300) for split in SPLITS}
    prompts = {split: {ex.prompt for ex in exs} for split, exs in splits.items()}
    problems = {split: {ex.problem for ex in exs} for split, exs in splits.items()}
    for split, exs in splits.items():
        assert len(prompts[split]) == 300, f"{split} repeats a prompt"
        assert all(split_of(ex.problem) == split for ex in exs)
    for a, b in [("train", "eval"), ("train", "heldout"), ("eval", "heldout")]:
        assert not prompts[a] & prompts[b], f"{a} and {b} share a prompt"
        # Another wording of the same problem must not cross splits either.
        assert not problems[a] & problems[b], f"{a} and {b} share a problem"


@ALL
def test_train_never_swallows_eval_even_when_large(task: Task) -> None:
    train = {ex.problem for ex in task.examples("train", 1000)}
    assert not train & {ex.problem for ex in task.examples("eval", 100)}


@ALL
def test_examples_are_deterministic_per_seed(task: Task) -> None:
    first = task.examples("eval", 50)
    assert first == task.examples("eval", 50)
    # A smaller request is a prefix, so n=60 and n=100 evals agree on shared items.
    assert task.examples("eval", 20) == first[:20]
    other_seed = task.examples("eval", 50, seed=1)
    assert other_seed == task.examples("eval", 50, seed=1)
    assert other_seed != first
    assert all(split_of(ex.problem) == "eval" for ex in other_seed)


@ALL
def test_prompts_state_the_output_format(task: Task) -> None:
    for ex in task.examples("train", 50):
        text = ex.prompt.lower()
        assert any(w in text for w in ("only", "nothing else", "just", "one word")), ex.prompt
        assert ex.answer and "\n" not in ex.answer


@ALL
def test_grader_accepts_the_answer_and_light_variants(task: Task) -> None:
    for ex in task.examples("eval", 20):
        answer = ex.answer
        for variant in (answer, f"{answer}\n", f"  {answer}  ", f"{answer}.", f"{answer}.\n", f"{answer}\nmore text"):
            assert task.grade(variant, answer), (variant, answer)


@ALL
def test_grader_rejects_wrong_answers(task: Task) -> None:
    examples = task.examples("eval", 40)
    for ex, other in itertools.pairwise(examples):
        if task.normalize(other.answer) != task.normalize(ex.answer):
            assert not task.grade(other.answer, ex.answer)
        assert not task.grade("", ex.answer)
        assert not task.grade(f"The answer is {ex.answer}", ex.answer)


def test_case_sensitivity_follows_the_task() -> None:
    assert get_task("sentiment").grade("Positive", "positive")
    assert not get_task("sentiment").grade("neutral", "positive")
    assert not get_task("json_extract").grade("lima", "Lima")


def test_list_sort_grader_ignores_comma_spacing() -> None:
    task = get_task("list_sort")
    assert task.grade("3,7, 12 ,40", "3, 7, 12, 40")
    assert not task.grade("7, 3, 12, 40", "3, 7, 12, 40")


def test_answers_are_correct() -> None:
    rng = random.Random(0)
    task = get_task("arithmetic")
    ops = {"+": operator.add, "-": operator.sub, "×": operator.mul}
    for _ in range(50):
        ex = task.make(rng)
        a, op, b = re.fullmatch(r"(\d+)([-+×])(\d+)", ex.key).groups()  # type: ignore[union-attr]
        assert str(ops[op](int(a), int(b))) == ex.answer
        assert f"{a} {op} {b}" in ex.prompt
    dates = get_task("dates").examples("eval", 30)
    assert all(len(ex.answer) == 10 and ex.answer[4] == ex.answer[7] == "-" for ex in dates)
    assert get_task("units").grade("420", "420")


def test_chat_messages_is_a_single_user_turn() -> None:
    assert chat_messages("hi") == [{"role": "user", "content": "hi"}]


def test_registry_refuses_duplicates_and_bad_tasks() -> None:
    registry = TaskRegistry([ArithmeticTask()])
    with pytest.raises(ValueError, match="already registered"):
        registry.register(ArithmeticTask())
    with pytest.raises(ValueError, match="already registered"):
        TaskRegistry([ArithmeticTask(), ArithmeticTask()])
    with pytest.raises(KeyError, match="unknown task 'nope'"):
        registry.get("nope")

    class Broken(ArithmeticTask):
        name = "broken"
        description = "Two sentences. Not allowed."

    with pytest.raises(ValueError, match="one sentence"):
        registry.register(Broken())

    class BadName(ArithmeticTask):
        name = "Bad Name"

    with pytest.raises(ValueError, match="task name"):
        registry.register(BadName())

    class Ungradeable(ArithmeticTask):
        name = "ungradeable"

        def make(self, rng: random.Random) -> Example:
            return Example(f"Say {rng.random()}. Answer with only the number.", "")

    with pytest.raises(ValueError, match="empty or does not grade"):
        registry.register(Ungradeable())
    assert registry.names() == ["arithmetic"]


def test_examples_validate_arguments() -> None:
    task = get_task("units")
    with pytest.raises(ValueError, match="split"):
        task.examples("test", 3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="n must be"):
        task.examples("train", -1)
    assert task.examples("train", 0) == []


def test_composite_task_needs_both_answers() -> None:
    from evals.tasks import COMPOSITE_TASKS, TASKS, all_task_names, get_task

    task = get_task("arithmetic_sentiment")
    assert "arithmetic_sentiment" in all_task_names() and "arithmetic_sentiment" not in TASKS  # never trained
    assert len(COMPOSITE_TASKS) >= 1
    ex = task.examples("eval", 1)[0]
    number, label = ex.answer.split("\n")
    assert number.lstrip("-").isdigit() and "positive or negative" in ex.prompt
    assert task.grade(f"{number}\n{label}", ex.answer)
    assert task.grade(f"The sum is {number}. The review is {label.capitalize()}.", ex.answer)
    assert not task.grade(number, ex.answer) and not task.grade(label, ex.answer)  # one skill is not enough
    assert not task.grade(f"1{number}\n{label}", ex.answer)  # not inside a longer number
    # its splits stay apart like every task's
    assert not {e.prompt for e in task.examples("train", 50)} & {e.prompt for e in task.examples("eval", 50)}


def _json_and_key(prompt: str) -> tuple[dict[str, object], str]:
    import json
    import re

    first, question = prompt.split("\n", 1)
    obj = json.loads(first.removeprefix("JSON: "))
    key = re.search(r'"(\w+)"', question)
    assert key is not None
    return obj, key.group(1)


def test_json_dates_answer_is_the_asked_fields_date_in_iso() -> None:
    import datetime as dt

    from evals.tasks import TASKS, get_task

    task = get_task("json_dates")
    assert "json_dates" not in TASKS  # held out: no expert is trained on it
    seen_other = False
    for ex in task.examples("heldout", 30):
        obj, key = _json_and_key(ex.prompt)
        dates = {k: v for k, v in obj.items() if k != "name"}
        assert len(dates) == 2 and key in dates  # two dates: finding the field is part of the skill
        day = dt.date.fromisoformat(ex.answer)
        written = str(dates[key])
        assert str(day.year) in written and (day.strftime("%B") in written or day.strftime("%b") in written)
        other = next(str(v) for k, v in dates.items() if k != key)
        seen_other |= str(day.year) not in other
        assert task.grade(ex.answer, ex.answer) and not task.grade(written, ex.answer)  # copying is not enough
    assert seen_other


def test_json_units_answer_converts_the_asked_field() -> None:
    from evals.tasks import get_task
    from evals.tasks.units import _CONVERSIONS

    task = get_task("json_units")
    factors = {(src, dst): f for src, dst, f, _ in _CONVERSIONS}
    for ex in task.examples("heldout", 30):
        obj, key = _json_and_key(ex.prompt)
        assert len(obj) == 3 and len(set(obj.values())) == 3  # three different quantities to choose from
        (factor,) = [f for (src, dst), f in factors.items() if f" {src}" in ex.prompt and f" {dst}" in ex.prompt]
        assert ex.answer == str(int(obj[key]) * factor)  # type: ignore[call-overload]
        assert not task.grade(str(obj[key]), ex.answer)
