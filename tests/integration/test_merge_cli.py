"""`moerge merge CONFIG [--output DIR]` and `moerge merges list|show|cancel` on SQLite and PostgreSQL: the
job runs in the CLI's process (same service and runner as the API), the result is registered and copied
to DIR; a bad config or a non-empty DIR fails with the field in the message and writes no job. The runner
driven directly: a job whose input is gone fails; recovery settles jobs whose worker died."""

from __future__ import annotations

import asyncio
import json
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from api.cli import app
from core.settings import Settings
from merging.jobs import MergeJobService
from registry import db
from registry.store import ArtifactStore
from tests.fixtures.db import BACKENDS
from tests.fixtures.merges import REFUSALS, build_merge_inputs, register_merge_inputs
from tests.fixtures.tiny import build_tiny_finetune

pytestmark = pytest.mark.parametrize("database_url", BACKENDS, indirect=True)

CONFIG = """\
merge_method: ties
base_model: tiny-base
models:
  - model: ft-a
    parameters: {weight: 1.0, density: 0.5}
  - model: ft-b
    parameters: {weight: 1.0, density: 0.5}
parameters: {normalize: true}
name: cli-ties
"""


@pytest.fixture
def empty_home(database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """MOERGE_HOME and the database for the CLI, migrated, nothing registered."""
    home = tmp_path / "home"
    monkeypatch.setenv("MOERGE_HOME", str(home))
    monkeypatch.setenv("MOERGE_DATABASE_URL", database_url)
    assert invoke("db", "upgrade")[0] == 0
    return home


@pytest.fixture(scope="module")
def merge_inputs(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return build_merge_inputs(tiny_base, tmp_path_factory.mktemp("merge-inputs"))


@pytest.fixture
def home(empty_home: Path, tmp_path: Path, tiny_base: Path, tiny_finetune: Path) -> Path:
    home = empty_home
    other = build_tiny_finetune(tiny_base, tmp_path / "ft-b", seed=9)
    for args in (
        (str(tiny_base), "--slug", "tiny-base"),
        (str(tiny_finetune), "--slug", "ft-a", "--base", "tiny-base"),
        (str(other), "--slug", "ft-b", "--base", "tiny-base"),
    ):
        code, output = invoke("expert", "add", *args)
        assert code == 0, output
    return home


def invoke(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.output


def invoke_json(*args: str) -> dict[str, Any]:
    """A command's JSON on stdout (the progress bar goes to stderr)."""
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)  # type: ignore[no-any-return]


def jobs() -> list[dict[str, Any]]:
    return invoke_json("merges", "list", "--json")["data"]  # type: ignore[no-any-return]


def test_merge_writes_output_and_registers(home: Path, tmp_path: Path) -> None:
    config = tmp_path / "cfg.yaml"
    config.write_text(CONFIG)
    dest = tmp_path / "out"
    code, output = invoke("merge", str(config), "--output", str(dest))
    assert code == 0, output
    assert "registered merged expert cli-ties" in output
    assert (dest / "config.json").is_file() and list(dest.glob("*.safetensors"))
    assert (dest / "moerge_merge.json").is_file() and (dest / "tokenizer.json").is_file()
    assert not list(tmp_path.glob(".out.partial-*"))

    record = invoke_json("expert", "show", "cli-ties")
    assert record["kind"] == "merged" and record["lineage"]["base"] == "tiny-base"
    (job,) = jobs()
    assert job["status"] == "succeeded" and job["result_expert"] == {"id": record["id"], "slug": "cli-ties"}
    assert record["lineage"]["merge_job_id"] == job["id"]
    assert invoke_json("merges", "show", str(job["id"]))["plan"]["merge_method"] == "ties"
    code, output = invoke("merges", "cancel", str(job["id"]))
    assert code == 1 and "already succeeded" in output
    assert not (home / "merges").exists() or not list((home / "merges").iterdir())

    # JSON config, into an existing empty folder
    json_config = tmp_path / "cfg.json"
    json_config.write_text(json.dumps({"merge_method": "linear", "models": [{"model": "ft-a"}, {"model": "ft-b"}]}))
    empty = tmp_path / "empty"
    empty.mkdir()
    finished = invoke_json("merge", str(json_config), "--output", str(empty), "--json")
    assert finished["status"] == "succeeded" and (empty / "config.json").is_file()
    assert invoke_json("expert", "show", finished["result_expert"]["slug"])["lineage"]["base"] == "tiny-base"


def test_bad_config_fails_before_any_job(home: Path, tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text(CONFIG.replace("density: 0.5}\n  - model: ft-b", "density: 1.5}\n  - model: ft-b"))
    code, output = invoke("merge", str(config))
    assert code == 1 and "models[0].parameters.density" in output
    config.write_text(CONFIG.replace("model: ft-b", "model: nobody"))
    code, output = invoke("merge", str(config))
    assert code == 1 and "models[1].model" in output and "nobody" in output

    good = tmp_path / "good.yaml"
    good.write_text(CONFIG)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    code, output = invoke("merge", str(good), "--output", str(busy))
    assert code == 1 and "output" in output and "not an empty folder" in output
    assert (busy / "keep.txt").read_text() == "mine"
    code, output = invoke("merge", str(tmp_path / "cfg.toml"))
    assert code == 1 and "config" in output
    assert jobs() == []
    assert invoke_json("expert", "list", "--json")["total"] == 3


def test_every_refusal_names_the_field_and_exits_nonzero(
    empty_home: Path, tmp_path: Path, tiny_base: Path, merge_inputs: dict[str, Path]
) -> None:
    """The API's refusals, through `moerge merge`: exit 1, the field in the message once, no job, no folder."""
    home = empty_home
    register_merge_inputs(Settings.from_env(), tiny_base, merge_inputs)
    config = tmp_path / "refused.yaml"
    dest = tmp_path / "out"
    for body, _status, param, reason in REFUSALS:
        config.write_text(body if isinstance(body, str) else json.dumps(body))
        code, output = invoke("merge", str(config), "--output", str(dest))
        flat = " ".join(output.split())  # rich wraps long lines
        assert code == 1 and param in flat and reason in flat, (body, output)
        assert f"{param}: {param}" not in flat, output  # named once, not prefixed twice
    assert jobs() == [] and not dest.exists()
    assert not (home / "merges").exists() or not list((home / "merges").iterdir())


def test_cancel_a_queued_job(home: Path) -> None:
    """A job queued for a server's worker, cancelled from the CLI before any worker took it."""
    settings = Settings.from_env()

    async def submit() -> str:
        engine = db.make_engine(settings.database_url)
        try:
            async with db.make_sessionmaker(engine)() as session:
                job = await MergeJobService(session, ArtifactStore(settings.store_dir)).submit_merge(
                    CONFIG, yaml_text=True
                )
                return str(job.id)
        finally:
            await engine.dispose()

    job_id = asyncio.run(submit())
    code, output = invoke("merges", "cancel", job_id)
    assert code == 0 and "cancelled" in output
    (job,) = jobs()
    assert job["status"] == "cancelled" and job["result_expert"] is None
    code, output = invoke("merges", "list", "--status", "cancelled")
    assert code == 0 and "1 jobs" in output


LINEAR = '{"merge_method": "linear", "models": [{"model": "ft-a"}, {"model": "tiny-base"}], "name": "%s"}'


def test_runner_fails_a_job_whose_input_is_gone_and_recovers_dead_workers(home: Path) -> None:
    """The runner driven directly: a job whose input was force-deleted after submission fails naming the
    field, with nothing registered; `running` jobs whose heartbeat went stale are settled by recovery:
    succeeded when their expert was registered (the worker died after registering), else failed."""
    from sqlalchemy import update

    from jobs.factory import make_worker
    from registry.models import Job, utcnow
    from registry.services import ExpertService

    settings = Settings.from_env()
    store = ArtifactStore(settings.store_dir)

    async def scenario() -> dict[str, Job]:
        engine = db.make_engine(settings.database_url)
        makers = db.make_sessionmaker(engine)
        runner = make_worker(makers, store, settings)
        runner.stale_after_s = 5

        async def set_job(job_id: object, **values: object) -> None:
            async with makers() as session:
                await session.execute(update(Job).where(Job.id == job_id).values(**values))
                await session.commit()

        try:
            async with makers() as session:
                doomed = await MergeJobService(session, store).submit_merge(CONFIG, yaml_text=True)
            async with makers() as session:  # a forced delete drops the job's input row too
                await ExpertService(session, store).delete("ft-b", force=True)
            assert (await runner.run_next()).id == doomed.id  # type: ignore[union-attr]

            async with makers() as session:
                fine = await MergeJobService(session, store).submit_merge(LINEAR % "fine")
            assert (await runner.run_next()).status == "succeeded"  # type: ignore[union-attr]
            # as if its worker had died between registering the expert and updating the job
            await set_job(fine.id, status="running", result_expert_id=None, progress=0.5)
            async with makers() as session:
                lost = await MergeJobService(session, store).submit_merge(
                    LINEAR % "lost", claimed_by="a-worker-that-died"
                )
            assert await runner.recover() == []  # heartbeats still fresh: another worker may be on them
            stale = utcnow() - timedelta(seconds=60)
            for job in (fine, lost):
                await set_job(job.id, heartbeat_at=stale)
            assert set(await runner.recover(sweep=True)) == {fine.id, lost.id}
            async with makers() as session:
                service = MergeJobService(session, store)
                return {
                    "doomed": await service.get(doomed.id),
                    "fine": await service.get(fine.id),
                    "lost": await service.get(lost.id),
                }
        finally:
            await engine.dispose()

    found = asyncio.run(scenario())
    assert found["doomed"].status == "failed" and found["doomed"].result_expert_id is None
    assert "models[1].model" in (found["doomed"].error or "") and "deleted" in (found["doomed"].error or "")
    assert found["fine"].status == "succeeded" and found["fine"].progress == 1.0
    assert found["fine"].result_expert_id is not None
    assert found["lost"].status == "failed" and "died" in (found["lost"].error or "")
    slugs = {e["slug"] for e in invoke_json("expert", "list", "--json")["data"]}
    assert slugs == {"tiny-base", "ft-a", "fine"}
    assert not (home / "merges").exists() or not list((home / "merges").iterdir())
