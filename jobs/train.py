"""Train jobs: an expert trained by a named recipe on its data, registered as a LoRA adapter of its base in the
transaction that marks the job succeeded, its training data attached, then added to the compositions the job
names (``add_to``), as if an admin had edited them (a slow router fit goes to a `fit` job).

Recipes are a registry (``RECIPES``): ``lora-sft`` (``jobs/lora_sft.py``) trains on rows given in the job or
on a named example source (``routers/examples.py``); the demo registers its own cached recipe (``evals``).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import msgspec
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from composition.mixtures import queue_fit, router_fitter
from composition.service import CompositionPatch, CompositionService
from core.errors import MoergeError, ValidationFailed
from jobs.lora_sft import SftRecipe, train_lora
from jobs.run import JobCancelled, JobHandler, JobRun
from registry.jobs import JobService
from registry.limits import MAX_LORA_RANK
from registry.models import Expert, ExpertKind, Job, JobKind
from registry.schemas import ExpertSpec, decode_strict
from registry.services import ExpertService, find_expert
from registry.store import ArtifactStore
from registry.training_data import TrainingDataService, TrainingRow
from routers.examples import example_rows, example_source_names
from routers.query import RouterContext

TRAIN_SHARE = 0.9  # of the progress bar; registering the adapter (hashing, storing) takes the rest
StepFn = Callable[[int, int, float], None]  # (step, steps, loss)


@dataclass
class Trained:
    """A recipe's result: the adapter folder, and the rows it was trained on (attached to the expert)."""

    folder: Path
    rows: list[TrainingRow] = field(default_factory=list)


class Recipe(Protocol):
    def check(self, params: dict[str, Any]) -> None:
        """ValidationFailed naming ``params.<field>`` for what this recipe cannot take."""
        ...

    def train(self, params: dict[str, Any], base_dir: Path, work_dir: Path, on_step: StepFn) -> Trained:
        """Train (in a worker thread; ``on_step`` may raise to stop it)."""
        ...


RECIPES: dict[str, Recipe] = {}


def register_recipe(name: str, recipe: Recipe) -> None:
    RECIPES[name] = recipe


class SftData(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """The examples: ``rows`` given in the job (each ``{"prompt", "answer"}``), or the first ``examples`` rows
    of a named example ``source`` (the demo's tasks, for one)."""

    rows: list[dict[str, str]] | None = None
    source: str | None = None
    examples: int = 1440


class LoraSftParams(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    data: SftData
    recipe: dict[str, Any] = msgspec.field(default_factory=dict)  # SftRecipe's fields (rank, steps, ...)


class LoraSft:
    """``lora-sft``: ``jobs/lora_sft.py`` on the job's rows or a named example source."""

    def _parsed(self, params: dict[str, Any]) -> tuple[list[TrainingRow], SftRecipe]:
        parsed = msgspec.convert(params, LoraSftParams)
        try:
            fields: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in parsed.recipe.items()}
            recipe = SftRecipe(**fields)
        except (TypeError, ValueError) as exc:
            raise ValidationFailed(f"params.recipe: {exc}", param="params.recipe") from None
        data = parsed.data
        if (data.rows is None) == (data.source is None):
            raise ValidationFailed("params.data: give exactly one of `rows` and `source`", param="params.data")
        if data.source is not None:
            if data.source not in example_source_names():
                raise ValidationFailed(
                    f"params.data.source: no example source {data.source!r} (one of: "
                    f"{', '.join(example_source_names()) or 'none installed'})",
                    param="params.data.source",
                )
            if not 1 <= data.examples <= 100_000:
                raise ValidationFailed("params.data.examples: between 1 and 100000", param="params.data.examples")
            rows = example_rows(data.source, data.examples)
        else:
            rows = [TrainingRow.from_prompt(r.get("prompt", ""), r.get("answer", "")) for r in data.rows or []]
        if not rows or any(not r.answer for r in rows):
            raise ValidationFailed(
                "params.data: every row needs an answer, and there must be rows", param="params.data"
            )
        return rows, recipe

    def check(self, params: dict[str, Any]) -> None:
        try:
            self._parsed(params)
        except msgspec.ValidationError as exc:
            raise ValidationFailed(f"params: {exc}", param="params") from None

    def train(self, params: dict[str, Any], base_dir: Path, work_dir: Path, on_step: StepFn) -> Trained:
        rows, recipe = self._parsed(params)
        work_dir.mkdir(parents=True, exist_ok=True)
        train_lora(rows, base_dir, work_dir, recipe, on_step=on_step)
        return Trained(work_dir, rows)


register_recipe("lora-sft", LoraSft())


class TrainRequest(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """POST /api/jobs/train: train ``expert`` (its slug and card fields) on ``base`` by ``recipe``."""

    recipe: str
    base: str  # the base expert's slug, alias or id
    expert: ExpertSpec  # kind and base are set by the job
    params: dict[str, Any] = msgspec.field(default_factory=dict)
    add_to: list[str] = msgspec.field(default_factory=list)  # compositions that take the expert once trained


async def submit_training(session: AsyncSession, store: ArtifactStore, raw: bytes | dict[str, Any]) -> Job:
    """Check a training request completely (recipe and its params, the base, the slug, the compositions), then
    queue it. Nothing is written when a check fails."""
    request = decode_strict(raw, TrainRequest) if isinstance(raw, bytes) else msgspec.convert(raw, TrainRequest)
    spec = request.expert.validate()
    recipe = RECIPES.get(request.recipe)
    if recipe is None:
        raise ValidationFailed(f"recipe: {request.recipe!r} is not one of {', '.join(sorted(RECIPES))}", param="recipe")
    recipe.check(request.params)
    base = await find_expert(session, request.base)
    if base is None or base.kind != ExpertKind.base.value:
        raise ValidationFailed(f"base: {request.base!r} is not a registered base model", param="base")
    for i, name in enumerate(request.add_to):
        if await CompositionService(session, store).find(name) is None:
            raise ValidationFailed(f"add_to[{i}]: no composition named {name!r}", param=f"add_to[{i}]")
    params = {
        "config": {"recipe": request.recipe, "base": str(base.id), "params": request.params, "add_to": request.add_to},
        "expert": msgspec.to_builtins(spec),
    }
    return await JobService(session).submit(JobKind.train.value, request.recipe, params, result_name=spec.slug)


class TrainHandler(JobHandler):
    kind = JobKind.train.value
    noun = "training"
    max_attempts = 2  # a lost worker's training starts once more from the beginning

    def __init__(
        self,
        sessionmaker: async_sessionmaker[AsyncSession],
        store: ArtifactStore,
        context: Callable[[], RouterContext],
        *,
        max_lora_rank: int = MAX_LORA_RANK,
    ) -> None:
        self.sessionmaker = sessionmaker
        self.store = store
        self.context = context
        self.max_lora_rank = max_lora_rank

    async def run(self, job: JobRun) -> None:
        config = job.params["config"]
        recipe = RECIPES.get(config["recipe"])
        if recipe is None:
            raise ValidationFailed(f"recipe: {config['recipe']!r} is not installed in this worker", param="recipe")
        base_dir = self.store.expert_dir(uuid.UUID(config["base"]))
        trained = await self._train(job, recipe, config["params"], base_dir)
        job.report(TRAIN_SHARE, "registering the trained adapter")
        expert = await self._register(job, trained, config["base"])
        result: dict[str, Any] = {"rows": len(trained.rows)}
        if config.get("add_to"):
            job.report(0.97, f"adding {expert.slug} to {', '.join(config['add_to'])}")
            try:
                result["added_to"] = await self._add_to(expert.slug, config["add_to"])
            except MoergeError as exc:  # the expert stays registered: say why it is not in the composition
                result["add_to_error"] = exc.message
        async with self.sessionmaker() as session:
            await job.succeed(session, f"registered {expert.slug}", expert_id=expert.id, result=result)
            await session.commit()

    async def _train(self, job: JobRun, recipe: Recipe, params: dict[str, Any], base_dir: Path) -> Trained:
        started = time.monotonic()

        def on_step(step: int, steps: int, loss: float) -> None:  # the training thread
            if job.stop_requested():
                raise JobCancelled(f"stopped at step {step} of {steps}")
            left = (time.monotonic() - started) / step * (steps - step)
            job.report(
                TRAIN_SHARE * step / steps, f"training: step {step}/{steps}, loss {loss:.3f}, ~{left:.0f} s left"
            )

        work = asyncio.ensure_future(asyncio.to_thread(recipe.train, params, base_dir, job.work_dir, on_step))
        try:
            return await asyncio.shield(work)
        except asyncio.CancelledError:
            job.stop("interrupted")
            with contextlib.suppress(Exception):
                await work  # the thread stops at its next step
            raise

    async def _register(self, job: JobRun, trained: Trained, base_id: str) -> Expert:
        """The adapter registered (while this worker still holds the job) with its training data attached. The
        job is marked succeeded once it is also in its compositions; a worker that dies in between leaves a
        registered result, which recovery settles as succeeded (``registered_result``): never a second one."""
        spec = msgspec.structs.replace(
            msgspec.convert(job.params["expert"], ExpertSpec),
            kind=ExpertKind.adapter.value,
            base=base_id,
            source_uri=f"train-job:{job.job_id}",
        )
        async with self.sessionmaker() as session:

            async def still_ours(_expert: Expert) -> None:  # in the registration's own transaction
                await job.check_lease(session)

            expert = await ExpertService(session, self.store, max_lora_rank=self.max_lora_rank).register_folder(
                trained.folder, spec, source_uri=spec.source_uri, before_commit=still_ours
            )
            if trained.rows:  # what it was trained on: ready for routers that train on experts' data
                await TrainingDataService(session, self.store).attach(expert.slug, trained.rows)
            return expert

    async def _add_to(self, slug: str, compositions: Sequence[str]) -> list[str]:
        """Add the new expert to each composition (its router refitted, a slow fit queued as a job)."""
        added: list[str] = []
        for name in compositions:
            async with self.sessionmaker() as session:
                service = CompositionService(session, self.store)
                comp = await service.find(name)
                if comp is None:
                    continue  # deleted since the job was queued
                current = list((await service.describe(comp))["experts"])  # in declared order
                if slug in current:
                    added.append(name)
                    continue
                fitter = router_fitter(session, self.store, self.context(), defer_slow=True)
                await service.update(name, CompositionPatch(experts=[*current, slug]), prepare=fitter)
                if fitter.deferred:
                    await queue_fit(session, name, comp.router)
                added.append(name)
        return added

    async def registered_result(self, session: AsyncSession, job: Job) -> uuid.UUID | None:
        found: uuid.UUID | None = await session.scalar(
            select(Expert.id).where(Expert.source_uri == f"train-job:{job.id}").limit(1)
        )
        return found
