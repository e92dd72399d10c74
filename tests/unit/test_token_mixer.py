"""The ``mixer`` token router on tiny seeded models: its router trains and lowers the loss on the composition's
examples, routes with sigmoid gates (not summing to 1) under top_k, validates its params naming the field, and
its state is stored once for the expert set and reused, not refitted."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from core.errors import ValidationFailed
from registry.training_data import TrainingRow
from routers import examples
from routers.token import TOKEN_ROUTERS, apply_mixture, load_lora_adapter
from routers.token import states as states_mod
from routers.token.mixer import MixerRouter, train_mixer
from routers.token.training import GateTrainingConfig
from serving.mixture.scores import mixer_route
from tests.fixtures.db import BACKENDS, RegistryEnv
from tests.unit.test_token_gates import (  # noqa: F401 (fixtures)
    TASKS,
    _Env,
    _register,
    one_thread,
    rows_of,
    sharp_base,
    task_experts,
)

FAST = GateTrainingConfig(steps=40, lr=0.05, batch_size=16, max_length=64)
TINY = {"training": {"steps": 3, "batch_size": 2, "max_length": 64}}


def both_tasks(n: int) -> list[TrainingRow]:
    """A composite's examples: each of the two experts' tasks, interleaved."""
    a, b = rows_of(TASKS[0], n), rows_of(TASKS[1], n)
    return [row for pair in zip(a, b, strict=True) for row in pair]


def examples_param(n: int) -> list[dict[str, str]]:
    return [{"prompt": row.messages[0]["content"], "answer": row.answer} for row in both_tasks(n)]


def test_training_lowers_the_loss_and_gives_one_state_per_adapter(
    sharp_base: Path,  # noqa: F811
    task_experts: dict[str, Path],  # noqa: F811
) -> None:
    adapters = [load_lora_adapter(task_experts[t], t) for t in TASKS]
    result = train_mixer(adapters, sharp_base, both_tasks(32), FAST, init=0.3)
    first, last = np.mean(result.losses[:5]), np.mean(result.losses[-5:])
    assert last < first * 0.9, (first, last)
    assert len(result.states) == 2
    for adapter, state in zip(adapters, result.states, strict=True):
        assert set(state) == set(adapter.modules)
        for module, row in state.items():
            # w_e over the module's inputs, then b_e; trained off their start (w = 0, b = logit(init))
            assert row.dtype == torch.float32 and row.shape == (adapter.modules[module].A.shape[1] + 1,)
        assert any(float(r[:-1].abs().max()) > 0 for r in state.values())
        assert any(abs(float(r[-1]) - math.log(0.3 / 0.7)) > 1e-3 for r in state.values())
    # Seeded: the same examples and config train the same router.
    short = GateTrainingConfig(steps=2, batch_size=2, max_length=64)
    a = train_mixer(adapters, sharp_base, both_tasks(4), short)
    b = train_mixer(adapters, sharp_base, both_tasks(4), short)
    for sa, sb in zip(a.states, b.states, strict=True):
        for m in sa:
            torch.testing.assert_close(sa[m], sb[m], atol=0, rtol=0)
    with pytest.raises(ValidationFailed, match="whole composition"):
        MixerRouter(TOKEN_ROUTERS.config("mixer", {"task": "json_dates"})).fit_adapter(adapters[0])


def test_route_gates_need_not_sum_to_one_and_respect_top_k() -> None:
    gen = torch.Generator().manual_seed(0)
    d, E, T = 24, 4, 30
    x = torch.randn(T, d, generator=gen)
    state = torch.cat([torch.randn(E, d, generator=gen), torch.tensor([[0.5], [-1.0], [2.0], [0.0]])], dim=1)
    available = torch.tensor([True, True, False, True])
    router = TOKEN_ROUTERS.build("mixer", {"task": "json_dates"})
    route = router.route(x, state, available)
    assert route.experts.shape == (T, 2) and route.weights.shape == (T, 2)
    assert not bool((route.experts == 2).any())  # never an expert that does not adapt the module
    expected = torch.sigmoid(x @ state[:, :-1].T / math.sqrt(d) + state[:, -1])
    for t in range(T):
        order = [e for e in sorted(range(E), key=lambda e: -float(expected[t, e])) if e != 2][:2]
        assert route.experts[t].tolist() == order
        torch.testing.assert_close(route.weights[t], expected[t, order])
    assert not torch.allclose(route.weights.sum(-1), torch.ones(T))  # gates, not a distribution
    one = TOKEN_ROUTERS.build("mixer", {"task": "json_dates", "top_k": 1}).route(x, state, available)
    assert one.experts.shape == (T, 1) and torch.equal(one.experts[:, 0], route.experts[:, 0])
    every = mixer_route(x, state, available, 8)
    assert every.experts.shape == (T, 3)  # top_k above the experts available: all of them
    # Zero router rows: every token gets the constant mix given by the biases.
    flat = torch.zeros(2, d + 1)
    flat[:, -1] = torch.tensor([math.log(0.4 / 0.6), math.log(0.8 / 0.2)])
    const = mixer_route(x, flat, torch.ones(2, dtype=torch.bool), 2)
    assert bool((const.experts[:, 0] == 1).all())
    torch.testing.assert_close(const.weights, torch.tensor([0.8, 0.4]).expand(T, 2))
    # A trained router's large logits give gates that all round to 1.0 in float32: still ranked by logit (the
    # order of the exact gates), not left to topk's handling of ties.
    saturated = torch.zeros(3, d + 1)
    saturated[:, -1] = torch.tensor([20.0, 40.0, 30.0])
    tied = mixer_route(x, saturated, torch.ones(3, dtype=torch.bool), 2)
    assert tied.experts.tolist() == [[1, 2]] * T
    assert bool((tied.weights == 1.0).all())


def test_config_validation_names_the_field() -> None:
    ok = TOKEN_ROUTERS.config("mixer", {"examples": [{"prompt": "p", "answer": "a"}]})
    assert len(ok.examples) == 1  # type: ignore[attr-defined]
    for params, field in (
        ({}, "examples"),  # neither examples nor task
        ({"task": "json_dates", "examples": [{"prompt": "p", "answer": "a"}]}, "examples"),
        ({"examples": [{"prompt": " ", "answer": "a"}]}, "examples[0].prompt"),
        ({"examples": [{"prompt": "p", "answer": ""}]}, "examples[0].answer"),
        ({"examples": [{"prompt": "p"}]}, "examples[0].answer"),
        ({"task": "no_such_task"}, "task"),
        ({"task": "json_dates", "task_examples": 0}, "task_examples"),
        ({"task": "json_dates", "top_k": 0}, "top_k"),
        ({"task": "json_dates", "init": 1.0}, "init"),
        ({"task": "json_dates", "init": float("nan")}, "init"),
        ({"task": "json_dates", "training": {"steps": 0}}, "training.steps"),
        ({"task": "json_dates", "temperature": 2}, "temperature"),
    ):
        with pytest.raises(ValidationFailed) as err:
            TOKEN_ROUTERS.config("mixer", params)
        assert err.value.param == f"router_params.{field}", (params, err.value.param)

    base = TOKEN_ROUTERS.build("mixer", {"task": "json_dates"})
    assert base.state_key()[0] == "mixer"
    assert TOKEN_ROUTERS.build("mixer", {"task": "json_dates", "top_k": 1}).state_key() == base.state_key()
    for other in (
        {"task": "json_units"},
        {"task": "json_dates", "task_examples": 8},
        {"task": "json_dates", "init": 0.4},
    ):
        assert TOKEN_ROUTERS.build("mixer", other).state_key() != base.state_key()
    # The task's train split gives the examples, the same ones every time.
    rows = base.config.rows()  # type: ignore[attr-defined]
    assert len(rows) == 64 and rows == base.config.rows()  # type: ignore[attr-defined]
    assert base.examples_digest() == TOKEN_ROUTERS.build("mixer", {"task": "json_dates", "top_k": 1}).examples_digest()


def test_task_names_an_installed_example_source(monkeypatch: pytest.MonkeyPatch) -> None:
    """``task`` names an example source the process installed (api installs the demo's evals tasks; routers never
    import evals): any installed source serves, and with none installed every name is refused, naming the field."""
    monkeypatch.setattr(examples, "_SOURCES", {})
    with pytest.raises(ValidationFailed) as err:
        TOKEN_ROUTERS.config("mixer", {"task": "json_dates"})
    assert err.value.param == "router_params.task" and "known: none" in err.value.message
    made = [TrainingRow.from_prompt(f"say {i}", str(i)) for i in range(10)]
    examples.register_example_source("counting", lambda n: made[:n])
    router = TOKEN_ROUTERS.build("mixer", {"task": "counting", "task_examples": 3})
    assert router.config.rows() == made[:3]  # type: ignore[attr-defined]


@pytest.fixture
def joint_fits(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """The adapter names of every mixer fit that really ran."""
    calls: list[list[str]] = []
    real = MixerRouter.fit_composition

    def counting(self: Any, adapters: Any, context: Any = None, real: Callable[..., Any] = real) -> Any:
        calls.append([a.name for a in adapters])
        return real(self, adapters, context)

    monkeypatch.setattr(MixerRouter, "fit_composition", counting)
    states_mod.clear_memo()
    return calls


@pytest.mark.parametrize("database_url", BACKENDS, indirect=True)
async def test_state_is_stored_for_the_expert_set_and_reused(
    registry_env: RegistryEnv,
    sharp_base: Path,  # noqa: F811
    task_experts: dict[str, Path],  # noqa: F811
    joint_fits: list[list[str]],
) -> None:
    await _register(registry_env, sharp_base, task_experts)
    env = _Env(registry_env)
    params = {**TINY, "examples": examples_param(4)}
    try:
        first = await env.states("mixer", params)  # no training data attached to the experts: none needed
        assert joint_fits == [["digits-lora", "letters-lora"]]
        rows = await env.rows("mixer")
        assert len(rows) == 2 and len({r.config_hash for r in rows}) == 1 and len({r.fingerprint for r in rows}) == 1
        assert [sorted(s) for s in first] == [sorted(load_lora_adapter(task_experts[t]).modules) for t in sorted(TASKS)]

        # Again, with another top_k, and from the database in a fresh process: not refitted.
        again = await env.states("mixer", {**params, "top_k": 1})
        states_mod.clear_memo()
        from_db = await env.states("mixer", params)
        assert len(joint_fits) == 1
        for a, b, c in zip(first, again, from_db, strict=True):
            for m in a:
                torch.testing.assert_close(a[m], b[m], atol=0, rtol=0)
                torch.testing.assert_close(a[m], c[m], atol=0, rtol=0)

        # Other examples, or another expert set, are another trained router.
        await env.states("mixer", {**TINY, "examples": examples_param(5)})
        assert len(joint_fits) == 2 and len(await env.rows("mixer")) == 4
        experts = await env.experts()
        steps: list[tuple[int, int]] = []  # a `fit` job's progress: every training step of the joint fit
        async with env.sessions() as session:
            alone = await states_mod.token_router_states(
                session, registry_env.store, "mixer", params, experts[:1], on_step=lambda s, n, _l: steps.append((s, n))
            )
        assert joint_fits[-1] == ["digits-lora"] and len(alone) == 1
        total = TINY["training"]["steps"]
        assert steps == [(s, total) for s in range(1, total + 1)]
        assert len(await env.rows("mixer")) == 5

        # The stored states drive a mixture: per-token routes of the right shape, gates as weights.
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(sharp_base, dtype=torch.float32).eval()
        adapters = [load_lora_adapter(task_experts[t], f"{t}-lora") for t in sorted(TASKS)]
        layers = apply_mixture(model, adapters, TOKEN_ROUTERS.build("mixer", {**params, "top_k": 1}), states=first)
        layer = next(iter(layers.values()))
        layer.record = True
        with torch.no_grad():
            model(input_ids=torch.randint(4, 200, (1, 9)))
        assert layer.last_route is not None and layer.last_route.experts.shape == (9, 1)
        assert bool(((layer.last_route.weights > 0) & (layer.last_route.weights < 1)).all())
        torch.testing.assert_close(layer.state[0], first[0][layer.name])
    finally:
        await env.engine.dispose()
