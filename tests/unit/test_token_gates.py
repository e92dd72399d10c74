"""PHATGOOSE gates and GLIDER's bias on tiny seeded models: gates train and prefer their own expert's data,
the routing math, the global bias, and router states stored once per expert and refitted when it changes."""

from __future__ import annotations

import asyncio
import math
import random
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from sqlalchemy import func, select

from core.errors import ValidationFailed
from evals.recipe import LoraRecipe, train_expert
from evals.tasks import Example, Split, Task
from registry import db
from registry.models import Expert, RouterState
from registry.schemas import ExpertSpec
from registry.services import ExpertService
from registry.training_data import TrainingDataService, TrainingRow
from routers.token import TOKEN_ROUTERS, apply_mixture, load_lora_adapter
from routers.token import states as states_mod
from routers.token.arrow import ArrowRouter
from routers.token.base import FitContext
from routers.token.glider import GliderRouter, glider_bias
from routers.token.phatgoose import GateTrainingConfig, PhatgooseRouter, train_gates
from serving.mixture.scores import phatgoose_route, phatgoose_scores, standardize
from tests.fixtures.db import BACKENDS, RegistryEnv


class _Letters(Task):
    name = "gate_letters"
    description = "Answers yes to a string of letters."
    skills = ("letters",)
    domains = ("test",)

    def make(self, rng: random.Random) -> Example:
        return Example("".join(rng.choice("abcdefghij") for _ in range(5)), "yes")


class _Digits(Task):
    name = "gate_digits"
    description = "Answers 42 to a string of digits."
    skills = ("digits",)
    domains = ("test",)

    def make(self, rng: random.Random) -> Example:
        return Example("".join(rng.choice("0123456789") for _ in range(5)), "42")


TASK_OBJECTS: dict[str, Task] = {"letters": _Letters(), "digits": _Digits()}
TASKS = ("letters", "digits")
# Tiny experts trained part of the way on their (short, trivial) task: at half strength (σ = 0.5, where gates
# start) they leave loss to win, so their gates have something to learn. (An expert already perfect at half
# strength gives its gate almost no gradient.)
EXPERT_RECIPE = LoraRecipe(
    rank=4, alpha=8, learning_rate=2e-2, warmup_steps=2, steps=8, batch_size=8, train_examples=64, max_length=64
)
FAST = GateTrainingConfig(steps=60, lr=0.05, batch_size=16, max_length=64)


def rows_of(task: str, n: int, split: Split = "train") -> list[TrainingRow]:
    return [TrainingRow.from_prompt(ex.prompt, ex.answer) for ex in TASK_OBJECTS[task].examples(split, n)]


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny models gain nothing from threads, and spinning threads are slow on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def sharp_base(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny base with its (tied) embeddings scaled up: at the default 0.02 init its logits span well under
    one nat, so no adapter could make it confident and a gate would have nothing to gain."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dest = tmp_path_factory.mktemp("sharp") / "sharp-base"
    model = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32)
    with torch.no_grad():
        embeddings = model.get_input_embeddings()
        assert isinstance(embeddings, torch.nn.Embedding)
        embeddings.weight.mul_(25.0)
    model.save_pretrained(dest)
    AutoTokenizer.from_pretrained(tiny_base).save_pretrained(dest)
    return dest


@pytest.fixture(scope="module")
def task_experts(sharp_base: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gate-experts")
    return {task: train_expert(TASK_OBJECTS[task], sharp_base, root, EXPERT_RECIPE, num_threads=1) for task in TASKS}


@pytest.fixture(scope="module")
def trained(sharp_base: Path, task_experts: dict[str, Path]) -> dict[str, Any]:
    return {
        task: train_gates(load_lora_adapter(folder, task), sharp_base, rows_of(task, 64), FAST)
        for task, folder in task_experts.items()
    }


# -- gate training ------------------------------------------------------------------------------------


def test_gates_train_and_lower_the_loss(trained: dict[str, Any], task_experts: dict[str, Path]) -> None:
    for task, result in trained.items():
        adapter = load_lora_adapter(task_experts[task])
        assert set(result.gates) == set(adapter.modules)
        for module, gate in result.gates.items():
            assert gate.dtype == torch.float32 and gate.shape == (adapter.modules[module].A.shape[1],)
        assert all(float(g.abs().max()) > 0 for g in result.gates.values())  # every gate moved off zero
        first, last = np.mean(result.losses[:5]), np.mean(result.losses[-5:])
        assert last < first * 0.9, (task, first, last)


def _module_inputs(base_dir: Path, modules: list[str], rows: list[TrainingRow]) -> dict[str, torch.Tensor]:
    """The base model's inputs to each module at the positions that predict the answer (the last prompt token
    and the answer's), on ``rows``: where gate training taught the gates."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from routers.token.encoding import IGNORE_INDEX, encode_chat

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    seen: dict[str, list[torch.Tensor]] = {m: [] for m in modules}
    keep: list[int] = []
    hooks = [
        model.get_submodule(m).register_forward_pre_hook(
            lambda _mod, args, m=m: seen[m].append(args[0][0, keep].detach())
        )
        for m in modules
    ]
    with torch.no_grad():
        for row in rows:
            ids, labels = encode_chat(tokenizer, row.messages, row.answer, 64)
            keep[:] = [i for i in range(len(ids) - 1) if labels[i + 1] != IGNORE_INDEX]
            model(input_ids=torch.tensor([ids]))
    for h in hooks:
        h.remove()
    return {m: torch.cat(xs) for m, xs in seen.items()}


def test_each_gate_prefers_its_own_experts_data(sharp_base: Path, trained: dict[str, Any]) -> None:
    """At the answer-predicting positions of task T's held-out examples, T's gate outscores the other expert's
    gate on average (over tokens and modules, for each task) and at most modules: the gates learned where
    their expert helps. Untrained (zero) or swapped gates fail this."""
    modules = sorted(trained[TASKS[0]].gates)
    wins, total = 0, 0
    for own, other in (TASKS, TASKS[::-1]):
        inputs = _module_inputs(sharp_base, modules, rows_of(own, 12, "eval"))
        margins = []
        for m in modules:
            gates = torch.stack([trained[own].gates[m], trained[other].gates[m]])
            scores = phatgoose_scores(inputs[m], gates)
            margins.append(float((scores[:, 0] - scores[:, 1]).mean()))
            wins += int(margins[-1] > 0)
            total += 1
        assert np.mean(margins) > 0.2, (own, margins)
    assert wins / total >= 0.7, f"own gate wins at {wins} of {total} (module, task) pairs"


def test_training_is_seeded_and_needs_data(sharp_base: Path, task_experts: dict[str, Path]) -> None:
    adapter = load_lora_adapter(task_experts["letters"])
    cfg = GateTrainingConfig(steps=2, batch_size=2, max_length=64)
    a = train_gates(adapter, sharp_base, rows_of("letters", 8), cfg)
    b = train_gates(adapter, sharp_base, rows_of("letters", 8), cfg)
    for m in a.gates:
        torch.testing.assert_close(a.gates[m], b.gates[m], atol=0, rtol=0)
    with pytest.raises(ValidationFailed, match="max_length") as err:
        train_gates(adapter, sharp_base, rows_of("letters", 4), GateTrainingConfig(steps=1, max_length=16))
    assert err.value.param == "router_params.training.max_length"
    with pytest.raises(ValidationFailed, match="training data") as err:
        PhatgooseRouter().fit_adapter(adapter)  # no FitContext: it cannot train
    with pytest.raises(ValidationFailed, match="training data"):
        PhatgooseRouter().fit_adapter(adapter, FitContext(base_dir=sharp_base))


# -- config and state identity ------------------------------------------------------------------------


def test_phatgoose_config_validation_and_state_key() -> None:
    assert TOKEN_ROUTERS.config("phatgoose", {}) == TOKEN_ROUTERS.get("phatgoose").config_cls()
    for params, field in (
        ({"top_k": 0}, "top_k"),
        ({"training": {"steps": 0}}, "training.steps"),
        ({"training": {"lr": -1.0}}, "training.lr"),
        ({"training": {"batch_size": 0}}, "training.batch_size"),
        ({"training": {"max_length": 4}}, "training.max_length"),
        ({"training": {"seed": -1}}, "training.seed"),
        ({"training": {"epochs": 3}}, "training.epochs"),
        ({"k": 2}, "k"),
    ):
        with pytest.raises(ValidationFailed) as err:
            TOKEN_ROUTERS.config("phatgoose", params)
        assert err.value.param == f"router_params.{field}", (params, err.value.param)

    key = TOKEN_ROUTERS.build("phatgoose", {}).state_key()
    assert key[0] == "phatgoose"
    # Routing parameters do not change the stored gates' identity; training parameters do.
    assert TOKEN_ROUTERS.build("phatgoose", {"top_k": 3}).state_key() == key
    assert TOKEN_ROUTERS.build("phatgoose", {"training": {"steps": 50}}).state_key() != key
    assert TOKEN_ROUTERS.build("phatgoose", {"training": {"seed": 1}}).state_key() != key
    arrow = TOKEN_ROUTERS.build("arrow", {}).state_key()
    assert TOKEN_ROUTERS.build("arrow", {"top_k": 1, "temperature": 0.3}).state_key() == arrow
    # glider stores under its local router: it shares the gates / prototypes.
    assert TOKEN_ROUTERS.build("glider", {"local_params": {"top_k": 1}}).state_key() == key
    assert TOKEN_ROUTERS.build("glider", {"local": "arrow"}).state_key() == arrow
    assert TOKEN_ROUTERS.build("glider", {}).requires_training_data()
    assert not TOKEN_ROUTERS.build("glider", {"local": "arrow"}).requires_training_data()


def test_glider_config_validation() -> None:
    for params, field in (
        ({"local": "nope"}, "local"),
        ({"scale": -1.0}, "scale"),
        ({"scale": float("nan")}, "scale"),
        ({"local": "arrow", "local_params": {"top_k": 0}}, "top_k"),
        ({"local_params": {"training": {"steps": 0}}}, "training.steps"),
    ):
        with pytest.raises(ValidationFailed) as err:
            TOKEN_ROUTERS.config("glider", params)
        assert err.value.param == f"router_params.{field}", (params, err.value.param)


# -- routing math -------------------------------------------------------------------------------------


def _by_hand(x: torch.Tensor, gates: torch.Tensor, available: list[bool], k: int, bias: torch.Tensor | None = None):
    """The routing rule written out for one token at a time, in float64."""
    d = x.shape[1]
    out = []
    for t in range(x.shape[0]):
        u = x[t].double()
        u = (u - u.mean()) / u.std()
        scores = []
        for e in range(gates.shape[0]):
            v = gates[e].double()
            v = (v - v.mean()) / v.std()
            s = float(u @ v) / math.sqrt(d) + (float(bias[t, e]) if bias is not None else 0.0)
            scores.append(s if available[e] else -math.inf)
        z = [math.exp(s - max(scores)) if s > -math.inf else 0.0 for s in scores]
        p = [v / sum(z) for v in z]
        top = sorted(range(len(p)), key=lambda e: -p[e])[:k]
        kept = sum(p[e] for e in top)
        out.append({e: p[e] / kept for e in top})
    return out


def test_route_standardizes_scales_softmaxes_and_renormalizes_top2() -> None:
    gen = torch.Generator().manual_seed(0)
    d, E = 48, 5
    x = torch.randn(30, d, generator=gen) * 3 + 1.5
    gates = torch.randn(E, d, generator=gen)
    available = torch.tensor([True, True, False, True, True])
    router = TOKEN_ROUTERS.build("phatgoose", {})
    route = router.route(x, gates, available)
    assert route.experts.shape == (30, 2) and route.weights.shape == (30, 2)
    assert not bool((route.experts == 2).any())  # never an expert that does not adapt the module
    torch.testing.assert_close(route.weights.sum(-1), torch.ones(30))
    expected = _by_hand(x, gates, available.tolist(), 2)
    for t in range(30):
        got = dict(zip(route.experts[t].tolist(), route.weights[t].tolist(), strict=True))
        assert set(got) == set(expected[t])
        for e in got:
            assert got[e] == pytest.approx(expected[t][e], abs=1e-5)
    # Standardization: scores ignore each vector's offset and scale.
    torch.testing.assert_close(
        phatgoose_scores(x * 7 - 2, gates * 0.1 + 4), phatgoose_scores(x, gates), atol=1e-4, rtol=1e-4
    )
    torch.testing.assert_close(standardize(torch.zeros(2, d)), torch.zeros(2, d))  # an untrained gate scores 0
    # Scores are standardized dot products / sqrt(d): a token against itself scores ~ (d - 1) / d * sqrt(d).
    self_score = phatgoose_scores(x[:1], x[:1])
    assert float(self_score) == pytest.approx((d - 1) / math.sqrt(d), rel=1e-4)
    # Top-1 and an expert set smaller than top_k.
    one = TOKEN_ROUTERS.build("phatgoose", {"top_k": 1}).route(x, gates, available)
    assert torch.equal(one.experts[:, 0], route.experts[:, 0]) and bool((one.weights == 1).all())
    few = phatgoose_route(x, gates, torch.tensor([False, True, False, False, False]), 2)
    assert few.experts.shape == (30, 1) and bool((few.experts == 1).all())


def test_bias_shifts_the_choice() -> None:
    gen = torch.Generator().manual_seed(1)
    x, gates = torch.randn(20, 32, generator=gen), torch.randn(4, 32, generator=gen)
    available = torch.ones(4, dtype=torch.bool)
    router = TOKEN_ROUTERS.build("phatgoose", {})
    plain = router.route(x, gates, available)
    assert not bool((plain.experts == 3).any(dim=1).all())  # without bias, expert 3 is not everyone's pick
    bias = torch.tensor([0.0, 0.0, 0.0, 5.0]).expand(20, 4)
    biased = router.route(x, gates, available, bias)
    assert bool((biased.experts[:, 0] == 3).all())
    expected = _by_hand(x, gates, [True] * 4, 2, bias)
    for t in range(20):
        got = dict(zip(biased.experts[t].tolist(), biased.weights[t].tolist(), strict=True))
        assert got == pytest.approx(expected[t], abs=1e-5)
    # A large bias cannot pick an expert that does not adapt the module.
    masked = router.route(x, gates, torch.tensor([True, True, True, False]), bias)
    assert not bool((masked.experts == 3).any())


# -- glider -------------------------------------------------------------------------------------------


def test_glider_bias_is_scaled_cosine_similarity() -> None:
    q = np.array([1.0, 0.0, 1.0], dtype=np.float32)
    experts = np.array([[2.0, 0.0, 2.0], [0.0, 3.0, 0.0], [-1.0, 0.0, -1.0], [1.0, 1.0, 0.0]], dtype=np.float32)
    bias = glider_bias(q, experts, scale=2.0)
    assert bias.dtype == torch.float32 and bias.shape == (4,)
    torch.testing.assert_close(bias, torch.tensor([2.0, 0.0, -2.0, 1.0]))
    torch.testing.assert_close(glider_bias(torch.tensor(q), torch.tensor(experts)), bias / 2)
    torch.testing.assert_close(glider_bias([0.0, 0.0, 0.0], experts), torch.zeros(4))  # no description: no bias
    with pytest.raises(ValueError, match=r"\[E, D\]"):
        glider_bias(q, experts[:, :2])


@pytest.mark.parametrize("local", ["phatgoose", "arrow"])
def test_glider_adds_the_bias_to_the_local_router(local: str) -> None:
    gen = torch.Generator().manual_seed(2)
    x, state = torch.randn(16, 24, generator=gen), torch.randn(3, 24, generator=gen)
    state = state / state.norm(dim=1, keepdim=True)  # unit vectors, like Arrow's prototypes
    available = torch.ones(3, dtype=torch.bool)
    glider = TOKEN_ROUTERS.build("glider", {"local": local, "local_params": {"top_k": 1}, "scale": 10.0})
    assert isinstance(glider, GliderRouter)
    local_router = TOKEN_ROUTERS.build(local, {"top_k": 1})
    for bias in (None, torch.zeros(16, 3)):
        same = glider.route(x, state, available, bias)
        ref = local_router.route(x, state, available)
        assert torch.equal(same.experts, ref.experts)
    # The query's task matches the description of an expert few tokens chose: the bias moves every token to it.
    favourite = int(ref.experts[:, 0].mode().values.item())
    target = (favourite + 1) % 3
    emb = torch.eye(3)
    bias_row = glider.bias(emb[target], emb)
    assert int(bias_row.argmax()) == target and float(bias_row[target]) == pytest.approx(10.0)
    routed = glider.route(x, state, available, bias_row.expand(16, 3))
    assert bool((routed.experts[:, 0] == target).all()) and not bool((ref.experts[:, 0] == target).all())


# -- stored states ------------------------------------------------------------------------------------


async def _register(env: RegistryEnv, base_dir: Path, adapters: dict[str, Path]) -> list[Expert]:
    engine = db.make_engine(env.settings.database_url)
    try:
        async with db.make_sessionmaker(engine)() as session:
            service = ExpertService(session, env.store)
            await service.register_folder(base_dir, ExpertSpec(slug="tiny-base"))
            return [
                await service.register_folder(folder, ExpertSpec(slug=f"{name}-lora", base="tiny-base"))
                for name, folder in adapters.items()
            ]
    finally:
        await engine.dispose()


class _Env:
    def __init__(self, env: RegistryEnv) -> None:
        self.env = env
        self.engine = db.make_engine(env.settings.database_url)
        self.sessions = db.make_sessionmaker(self.engine)

    async def experts(self) -> list[Expert]:
        async with self.sessions() as session:
            return list(await session.scalars(select(Expert).where(Expert.kind == "adapter").order_by(Expert.slug)))

    async def states(self, router: str, params: dict[str, Any]) -> list[dict[str, torch.Tensor]]:
        experts = await self.experts()
        async with self.sessions() as session:
            return await states_mod.token_router_states(session, self.env.store, router, params, experts)

    async def attach(self, slug: str, rows: list[TrainingRow]) -> None:
        async with self.sessions() as session:
            await TrainingDataService(session, self.env.store).attach(slug, rows)

    async def rows(self, router: str | None = None) -> list[RouterState]:
        async with self.sessions() as session:
            query = select(RouterState)
            if router:
                query = query.where(RouterState.router == router)
            return list(await session.scalars(query))


@pytest.fixture
def fits(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """(router, adapter name) of every fit that really ran."""
    calls: list[tuple[str, str]] = []
    for cls in (PhatgooseRouter, ArrowRouter):
        real = cls.fit_adapter

        def counting(self: Any, adapter: Any, context: Any = None, real: Callable[..., Any] = real) -> Any:
            calls.append((self.name, adapter.name))
            return real(self, adapter, context)

        monkeypatch.setattr(cls, "fit_adapter", counting)
    monkeypatch.setattr(ArrowRouter, "_cache", {})
    states_mod.clear_memo()
    return calls


TINY_PG = {"training": {"steps": 3, "batch_size": 2, "max_length": 64}}


@pytest.mark.parametrize("database_url", BACKENDS, indirect=True)
async def test_states_are_stored_once_and_reused(
    registry_env: RegistryEnv, sharp_base: Path, task_experts: dict[str, Path], fits: list[tuple[str, str]]
) -> None:
    await _register(registry_env, sharp_base, task_experts)
    env = _Env(registry_env)
    try:
        # Without training data phatgoose names the expert that lacks it; arrow needs none.
        with pytest.raises(ValidationFailed, match="digits-lora") as err:
            await env.states("phatgoose", TINY_PG)
        assert err.value.param == "experts[0]" and fits == []
        for task in TASKS:
            await env.attach(f"{task}-lora", rows_of(task, 20))

        first = await env.states("phatgoose", TINY_PG)
        assert sorted(fits) == [("phatgoose", "digits-lora"), ("phatgoose", "letters-lora")]
        assert [sorted(s) for s in first] == [sorted(load_lora_adapter(task_experts[t]).modules) for t in sorted(TASKS)]
        assert len(await env.rows("phatgoose")) == 2

        fits.clear()
        again = await env.states("phatgoose", {**TINY_PG, "top_k": 1})  # routing params: same stored gates
        states_mod.clear_memo()  # a fresh process: read from the database, not refitted
        from_db = await env.states("glider", {"local_params": TINY_PG, "scale": 3.0})
        assert fits == []
        for a, b, c in zip(first, again, from_db, strict=True):
            for m in a:
                torch.testing.assert_close(a[m], b[m], atol=0, rtol=0)
                torch.testing.assert_close(a[m], c[m], atol=0, rtol=0)

        # Other training parameters are another state.
        await env.states("phatgoose", {"training": {**TINY_PG["training"], "seed": 1}})
        assert len(fits) == 2 and len(await env.rows("phatgoose")) == 4

        # Arrow: prototypes, stored under "arrow" whatever top_k.
        fits.clear()
        await env.states("arrow", {"top_k": 1})
        await env.states("glider", {"local": "arrow"})
        assert sorted(fits) == [("arrow", "digits-lora"), ("arrow", "letters-lora")]
        assert len(await env.rows("arrow")) == 2

        # The stored states drive a mixture.
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(sharp_base, dtype=torch.float32).eval()
        adapters = [load_lora_adapter(task_experts[t], f"{t}-lora") for t in sorted(TASKS)]
        layers = apply_mixture(model, adapters, TOKEN_ROUTERS.build("phatgoose", TINY_PG), states=first)
        layer = next(iter(layers.values()))
        layer.record = True
        with torch.no_grad():
            model(input_ids=torch.randint(4, 200, (1, 9)))
        assert layer.last_route is not None and layer.last_route.experts.shape == (9, 2)
        torch.testing.assert_close(layer.state[0], first[0][layer.name])
    finally:
        await env.engine.dispose()


@pytest.mark.parametrize("database_url", BACKENDS, indirect=True)
async def test_changed_expert_or_data_is_refitted(
    registry_env: RegistryEnv, sharp_base: Path, task_experts: dict[str, Path], fits: list[tuple[str, str]]
) -> None:
    await _register(registry_env, sharp_base, task_experts)
    env = _Env(registry_env)
    try:
        for task in TASKS:
            await env.attach(f"{task}-lora", rows_of(task, 20))
        before = await env.states("phatgoose", TINY_PG)
        fits.clear()
        # Same data again: nothing changes. New data for one expert: that one is refitted, its row replaced.
        await env.attach("letters-lora", rows_of("letters", 20))
        await env.states("phatgoose", TINY_PG)
        assert fits == []
        await env.attach("letters-lora", rows_of("letters", 20, "eval"))
        after = await env.states("phatgoose", TINY_PG)
        assert fits == [("phatgoose", "letters-lora")]
        rows = await env.rows("phatgoose")
        assert len(rows) == 2 and len({r.fingerprint for r in rows}) == 2
        assert any(not torch.equal(before[1][m], after[1][m]) for m in before[1])
        for m in before[0]:
            assert torch.equal(before[0][m], after[0][m])

        # A changed adapter (its files, hence its manifest) is refitted too.
        fits.clear()
        async with env.sessions() as session:
            expert = await session.scalar(select(Expert).where(Expert.slug == "digits-lora"))
            assert expert is not None
            expert.manifest_sha256 = "0" * 64
            await session.commit()
        await env.states("arrow", {})
        fits.clear()
        await env.states("phatgoose", TINY_PG)
        await env.states("arrow", {})
        assert fits == [("phatgoose", "digits-lora")]
    finally:
        await env.engine.dispose()


@pytest.mark.parametrize("database_url", BACKENDS, indirect=True)
async def test_concurrent_callers_fit_once_and_a_racing_replica_is_tolerated(
    registry_env: RegistryEnv,
    sharp_base: Path,
    task_experts: dict[str, Path],
    fits: list[tuple[str, str]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    await _register(registry_env, sharp_base, {"letters": task_experts["letters"]})
    env = _Env(registry_env)
    try:
        await env.attach("letters-lora", rows_of("letters", 20))
        results = await asyncio.gather(*(env.states("phatgoose", TINY_PG) for _ in range(3)))
        assert fits == [("phatgoose", "letters-lora")]
        assert len(await env.rows("phatgoose")) == 1
        for r in results[1:]:
            for m in results[0][0]:
                assert torch.equal(results[0][0][m], r[0][m])

        # Another replica stores the same state while this process fits it: the unique constraint refuses
        # the second insert, which is rolled back; the caller still gets its state.
        states_mod.clear_memo()
        fits.clear()
        real_fit = states_mod._fit
        key = TOKEN_ROUTERS.build("phatgoose", {"training": {**TINY_PG["training"], "seed": 7}}).state_key()

        def fit_while_replica_saves(router: Any, job: Any, examples: Any) -> Any:
            state = real_fit(router, job, examples)

            async def replica() -> None:
                other = db.make_engine(registry_env.settings.database_url)
                try:
                    async with db.make_sessionmaker(other)() as session:
                        session.add(
                            RouterState(
                                router=key[0],
                                config_hash=key[1],
                                expert_id=uuid.UUID(job.expert_id),
                                fingerprint=job.fingerprint,
                                payload=states_mod.encode_state(state),
                            )
                        )
                        await session.commit()
                finally:
                    await other.dispose()

            asyncio.run(replica())  # runs in the fitting thread, like another process would
            return state

        monkeypatch.setattr(states_mod, "_fit", fit_while_replica_saves)
        got = await env.states("phatgoose", {"training": {**TINY_PG["training"], "seed": 7}})
        assert len(fits) == 1 and sorted(got[0]) == sorted(results[0][0])
        async with env.sessions() as session:
            count = await session.scalar(
                select(func.count()).select_from(RouterState).where(RouterState.config_hash == key[1])
            )
        assert count == 1
    finally:
        await env.engine.dispose()


async def test_states_refuse_non_adapters(registry_env: RegistryEnv, tiny_base: Path, tiny_lora: Path) -> None:
    await _register(registry_env, tiny_base, {"x": tiny_lora})
    env = _Env(registry_env)
    try:
        async with env.sessions() as session:
            experts = list(await session.scalars(select(Expert).order_by(Expert.slug)))  # tiny-base, x-lora
            with pytest.raises(ValidationFailed, match="not a LoRA adapter") as err:
                await states_mod.token_router_states(session, registry_env.store, "arrow", {}, experts)
        assert err.value.param == "experts[0]"
    finally:
        await env.engine.dispose()


def test_a_token_router_names_its_query_level_part_through_a_hook() -> None:
    """Fitting and resolving ask the router for its query-level part (composition/mixtures.py, one fitter for
    the API and the CLI) instead of checking for `glider` by name."""
    from routers.token import TOKEN_ROUTERS

    assert TOKEN_ROUTERS.get("arrow").cls.query_part({}) is None
    assert TOKEN_ROUTERS.get("phatgoose").cls.query_part({}) is None
    name, params = TOKEN_ROUTERS.get("glider").cls.query_part({"model": "base", "max_new_tokens": 24, "scale": 2.0})
    assert name == "instruct" and params == {"model": "base", "max_new_tokens": 24, "threshold": -1.0}


async def test_fitting_reports_each_expert_fitted(
    registry_env: RegistryEnv, tiny_base: Path, tiny_lora: Path, tmp_path: Path
) -> None:
    """A `fit` job's progress: one report per expert fitted, none for states already stored."""
    from tests.fixtures.tiny import build_tiny_lora

    await _register(registry_env, tiny_base, {"x": tiny_lora, "y": build_tiny_lora(tiny_base, tmp_path / "y", seed=4)})
    env = _Env(registry_env)
    try:
        reports: list[tuple[int, int]] = []
        async with env.sessions() as session:
            experts = list(await session.scalars(select(Expert).where(Expert.kind == "adapter").order_by(Expert.slug)))
            await states_mod.token_router_states(
                session, registry_env.store, "arrow", {}, experts, on_fitted=lambda d, t: reports.append((d, t))
            )
        assert reports == [(1, 2), (2, 2)]
        states_mod.clear_memo()
        async with env.sessions() as session:
            experts = list(await session.scalars(select(Expert).where(Expert.kind == "adapter").order_by(Expert.slug)))
            await states_mod.token_router_states(
                session, registry_env.store, "arrow", {}, experts, on_fitted=lambda d, t: reports.append((d, t))
            )
        assert reports == [(1, 2), (2, 2)]  # stored: nothing fitted again
    finally:
        await env.engine.dispose()
