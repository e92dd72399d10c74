"""The `moerge` command line: init, db, serve, demo, expert add|list|show|rm|verify|training-data, merge, merges.

Commands act on the local database and store through the same services as the API. Every refusal is a
one-line message on stderr naming the field, and a non-zero exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from datetime import datetime
from functools import wraps
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from composition.service import CompositionPatch, CompositionService, CompositionSpec, PrepareHook
from core.errors import MoergeError, ValidationFailed
from core.settings import Settings
from core.tracing import setup_tracing, shutdown_tracing
from registry import db
from registry.cards import render_card
from registry.keys import KeySettings
from registry.schemas import ExpertSpec
from registry.services import ApiKeyService, ExpertService, expert_summary
from registry.store import ArtifactStore, Damage

if TYPE_CHECKING:
    from registry.jobs import JobService

app = typer.Typer(
    help="moerge: recycle specialist models and LoRA adapters into one composed system.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
db_app = typer.Typer(help="Database migrations.", no_args_is_help=True)
expert_app = typer.Typer(help="Register, list, show, remove and verify experts.", no_args_is_help=True)
app.add_typer(db_app, name="db")
app.add_typer(expert_app, name="expert")
composition_app = typer.Typer(help="Create, list, show, update and remove compositions.", no_args_is_help=True)
app.add_typer(composition_app, name="composition")
merges_app = typer.Typer(help="List, show and cancel merge jobs (run one with `moerge merge`).", no_args_is_help=True)
app.add_typer(merges_app, name="merges")
jobs_app = typer.Typer(help="List, show and cancel jobs: merges, training, fitting.", no_args_is_help=True)
app.add_typer(jobs_app, name="jobs")

out = Console()
err = Console(stderr=True, soft_wrap=True)
T = TypeVar("T")


@contextlib.contextmanager
def counted(description: str, total: int, *, every_s: float = 5.0) -> Iterator[Callable[[], None]]:
    """A progress bar on a terminal; in a log (stderr not a terminal), a line every ``every_s`` seconds.
    Yields the function that counts one more done."""
    if err.is_terminal:
        from rich.progress import Progress

        with Progress(console=err) as progress:
            bar = progress.add_task(description, total=total)
            yield lambda: progress.advance(bar)
        return
    done = 0
    last = time.monotonic()

    def advance() -> None:
        nonlocal done, last
        done += 1
        if time.monotonic() - last >= every_s or done == total:
            last = time.monotonic()
            err.print(f"{description} {done}/{total} ({100 * done / max(total, 1):.0f}%)", highlight=False)

    yield advance


def fail(message: str, code: int = 1) -> typer.Exit:
    err.print(f"[red]error:[/red] {escape(message)}", highlight=False)
    return typer.Exit(code)


def handles_errors(fn: Callable[..., T]) -> Callable[..., T]:
    """Turn moerge's errors into a message and exit code 1 (the traceback is for bugs only)."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        try:
            return fn(*args, **kwargs)
        except MoergeError as exc:
            # most messages already start with the field they name
            where = f"{exc.param}: " if exc.param and not exc.message.startswith(exc.param) else ""
            raise fail(f"{where}{exc.message}") from None

    return wrapper


async def _with_sessionmaker(
    settings: Settings,
    work: Callable[[async_sessionmaker[AsyncSession], ArtifactStore], Awaitable[T]],
    *,
    check: bool = True,
) -> T:
    engine = db.make_engine(settings.database_url)
    try:
        if check:
            await db.ensure_migrated(engine)
        store = ArtifactStore(settings.store_dir)
        store.ensure()
        return await work(db.make_sessionmaker(engine), store)
    finally:
        await engine.dispose()


async def _with_session(
    settings: Settings, work: Callable[[AsyncSession, ArtifactStore], Awaitable[T]], *, check: bool = True
) -> T:
    async def in_session(sessionmaker: async_sessionmaker[AsyncSession], store: ArtifactStore) -> T:
        async with sessionmaker() as session:
            return await work(session, store)

    return await _with_sessionmaker(settings, in_session, check=check)


async def _with_services(
    settings: Settings, work: Callable[[ExpertService, ApiKeyService], Awaitable[T]], *, check: bool = True
) -> T:
    return await _with_session(
        settings,
        lambda session, store: work(
            ExpertService(session, store, max_lora_rank=settings.max_lora_rank), ApiKeyService(session)
        ),
        check=check,
    )


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


# -- db / init -----------------------------------------------------------------------------------------
@db_app.command("upgrade")
@handles_errors
def db_upgrade(revision: str = typer.Argument("head", help="target revision")) -> None:
    """Create or migrate the database to the current schema."""
    settings = Settings.from_env()
    db.upgrade(settings.database_url, revision)
    out.print(f"database migrated to {revision} ({_safe_url(settings.database_url)})")


@db_app.command("current")
@handles_errors
def db_current() -> None:
    """Print the database's revision and the code's."""
    settings = Settings.from_env()

    async def read() -> str | None:
        engine = db.make_engine(settings.database_url)
        try:
            return await db.current_revision(engine)
        finally:
            await engine.dispose()

    out.print(f"database: {run(read())}  code: {db.head_revision()}")


def _safe_url(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


@app.command()
@handles_errors
def init() -> None:
    """Migrate the database, create the store, and print a first admin API key (once)."""
    settings = Settings.from_env()
    db.upgrade(settings.database_url)
    secret = run(_with_services(settings, lambda _e, keys: keys.create_first_admin(settings.admin_key)))
    out.print(f"MOERGE_HOME: {settings.home}")
    if secret is None:
        out.print("API keys already exist: none printed (create one with `moerge keys create`)")
    elif settings.admin_key:
        out.print("admin key: taken from MOERGE_ADMIN_KEY")
    else:
        out.print(f"admin key (shown once, keep it): {secret}")


STRATEGY_KINDS = ("routers", "token_routers", "aggregators", "merge_methods")


@app.command()
@handles_errors
def strategies(
    kind: Annotated[
        str | None, typer.Argument(help="routers, token_routers, aggregators or merge_methods (all when left out)")
    ] = None,
) -> None:
    """List the routers, token routers, aggregators and merge methods with their help and parameters."""
    from api.schemas import Strategies

    if kind is not None and kind not in STRATEGY_KINDS:
        raise fail(f"kind: must be one of {', '.join(STRATEGY_KINDS)}, not {kind!r}")
    listed = Strategies.listed()
    for group in STRATEGY_KINDS:
        if kind is not None and group != kind:
            continue
        out.print(f"{group}:", markup=False)
        for entry in getattr(listed, group):
            out.print(f"  {entry.name}: {entry.help}", markup=False)
            for param in entry.params:
                default = "required" if param.required else f"default {param.default!r}"
                out.print(f"    {param.name} ({param.type}, {default}): {param.help}", markup=False)


keys_app = typer.Typer(help="API keys.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")


@keys_app.command("create")
@handles_errors
def keys_create(
    name: str,
    scope: Annotated[
        list[str],
        typer.Option(
            "--scope", help="query, admin or fetch (read expert files only: a vLLM resolver); repeat for more"
        ),
    ] = ["query"],  # noqa: B006
    model: Annotated[
        list[str] | None, typer.Option("--model", help="a model it may use; repeat (default: every model)")
    ] = None,
    rpm_limit: Annotated[int | None, typer.Option(help="requests per minute")] = None,
    tpm_limit: Annotated[int | None, typer.Option(help="tokens (prompt + completion) per minute")] = None,
    token_budget: Annotated[int | None, typer.Option(help="tokens in all, never renewed")] = None,
    duration: Annotated[str | None, typer.Option(help="expires after this long: 30d, 12h, 15m, 90s, 2w")] = None,
    expires_at: Annotated[str | None, typer.Option(help="expires at this ISO date and time (UTC if no zone)")] = None,
) -> None:
    """Create an API key and print its secret once (only its hash is stored)."""
    try:
        expires = datetime.fromisoformat(expires_at) if expires_at else None
    except ValueError:
        raise ValidationFailed("expires_at must be an ISO date and time", param="expires_at") from None
    options = KeySettings.checked(name, scope, models=model or None, rpm_limit=rpm_limit, tpm_limit=tpm_limit,
                                  token_budget=token_budget, duration=duration, expires_at=expires)  # fmt: skip
    _, secret = run(_with_services(Settings.from_env(), lambda _e, keys: keys.create_with(options)))
    out.print(secret)


def _key_rows(keys: Any) -> list[dict[str, Any]]:
    import msgspec

    from api.keys.schemas import describe

    return [msgspec.to_builtins(describe(k, minute)) for k, minute in keys]


@keys_app.command("list")
@handles_errors
def keys_list(
    include_revoked: Annotated[bool, typer.Option("--all", help="revoked keys too")] = False,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """List API keys: prefix, scopes, status, expiry, limits and usage (never a secret or hash)."""

    async def work(_e: ExpertService, keys: ApiKeyService) -> list[dict[str, Any]]:
        page = await keys.list_keys(limit=500, include_revoked=include_revoked)
        minutes = await keys.window_usage([k.id for k in page.items])
        return _key_rows([(k, minutes.get(k.id)) for k in page.items])

    rows = run(_with_services(Settings.from_env(), work))
    if as_json:
        out.print_json(json.dumps(rows))
        return
    table = Table(title="API keys (revoke or rotate one by its prefix or id; --json shows the ids)")
    table.add_column("prefix", no_wrap=True)
    for column in ("name", "scopes", "status", "expires", "models", "limits", "usage"):
        table.add_column(column, overflow="fold")
    for r in rows:
        limits = ", ".join(f"{n}={r[n]}" for n in ("rpm_limit", "tpm_limit", "token_budget") if r[n] is not None)
        usage = r["usage"]
        table.add_row(
            r["prefix"], escape(r["name"]), ",".join(r["scopes"]), r["status"], (r["expires_at"] or "never")[:16],
            escape(",".join(r["models"])) if r["models"] is not None else "any", limits or "none",
            f"{usage['requests']} req, {usage['tokens']} tok" if usage["counted"] else "not counted",
        )  # fmt: skip
    out.print(table)


@keys_app.command("revoke")
@handles_errors
def keys_revoke(key: Annotated[str, typer.Argument(help="the key's id or prefix")]) -> None:
    """Revoke a key: every server refuses it within a second; its admin panel sessions end."""
    revoked = run(_with_services(Settings.from_env(), lambda _e, keys: keys.revoke(key)))
    out.print(f"revoked {escape(revoked.name)} ({revoked.prefix}..., {revoked.id})")


@keys_app.command("rotate")
@handles_errors
def keys_rotate(key: Annotated[str, typer.Argument(help="the key's id or prefix")]) -> None:
    """A new secret with the same settings (printed once); the old key is revoked."""
    _, secret = run(_with_services(Settings.from_env(), lambda _e, keys: keys.rotate(key)))
    out.print(secret)


# -- serve / demo ---------------------------------------------------------------------------------------
@app.command()
@handles_errors
def serve(
    host: Annotated[str | None, typer.Option(help="address to bind (MOERGE_HOST)")] = None,
    port: Annotated[int | None, typer.Option(help="port (MOERGE_PORT)")] = None,
    worker: Annotated[
        bool, typer.Option("--worker/--no-worker", help="run queued jobs in this process too (else `moerge worker`)")
    ] = True,
) -> None:
    """Start the API server."""
    settings = Settings.from_env()
    run(_with_services(settings, _noop))  # refuse an unmigrated database before binding a port
    _serve(settings, host or settings.host, port or settings.port, worker=worker)


async def _noop(*_: Any) -> None:
    return None


def _serve(settings: Settings, host: str, port: int, *, worker: bool = True) -> None:
    from api.app import create_app
    from api.drain import serve as serve_draining

    out.print(f"moerge API on http://{host}:{port}  (health: /api/health, readiness: /api/ready, OpenAPI: /api/schema)")
    # SIGTERM drains: /api/ready and new requests answer 503, the requests in flight get MOERGE_DRAIN_S to finish.
    try:
        serve_draining(create_app(settings, worker=worker), host=host, port=port, log_level="info")
    finally:
        shutdown_tracing()  # the spans still queued are exported (create_app set tracing up)


@app.command("worker")
@handles_errors
def worker_command(
    drain: Annotated[bool, typer.Option("--drain", help="run the queued jobs, then exit")] = False,
    kinds: Annotated[
        str | None, typer.Option(help="comma-separated kinds to take (merge, train, fit); all when left out")
    ] = None,
) -> None:
    """Run queued jobs (merges, training, fitting) in this process, beside any number of servers and other
    workers on the same database and store. SIGTERM or Ctrl-C stops it; a job in progress goes back to the queue."""
    taken = [k.strip() for k in kinds.split(",") if k.strip()] if kinds is not None else None
    settings = Settings.from_env()
    setup_tracing()  # OTLP export when OTEL_EXPORTER_OTLP_ENDPOINT is set
    try:
        run(_run_worker(settings, drain=drain, kinds=taken))
    finally:
        shutdown_tracing()


async def _run_worker(settings: Settings, *, drain: bool, kinds: list[str] | None = None) -> None:
    from jobs.factory import WorkerContext, make_worker
    from jobs.worker import Worker

    async def work(sessionmaker: async_sessionmaker[AsyncSession], store: ArtifactStore) -> None:
        context = WorkerContext(settings, sessionmaker, store)
        try:
            await _work(make_worker(sessionmaker, store, settings, context=context, kinds=kinds))
        finally:
            await context.close()

    async def _work(worker: Worker) -> None:
        kinds = ", ".join(worker.handlers)
        out.print(f"worker {worker.name}: runs {kinds} jobs from {_safe_url(settings.database_url)}", highlight=False)
        if drain:
            await worker.recover(sweep=True)
            while await worker.run_next() is not None:
                pass
            return
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await worker.start()
        try:
            await stop.wait()
        finally:
            await worker.stop()  # the job in progress stops at its next chance and is re-queued
        out.print(f"worker {worker.name}: stopped", highlight=False)

    await _with_sessionmaker(settings, work)


@app.command()
@handles_errors
def demo(
    serve_api: Annotated[bool, typer.Option("--serve/--no-serve", help="serve the API at the end")] = True,
    samples: Annotated[bool, typer.Option("--samples/--no-samples", help="ask each served expert one query")] = True,
) -> None:
    """The main job: convert SmolLM2, register it and every expert trained before, serve at once on vLLM, and
    train the missing experts as background jobs (each joins `auto` the moment it is trained)."""
    from api.demo import BackgroundTraining, prepare_demo, serve_in_thread

    settings = Settings.from_env()
    settings.home.mkdir(parents=True, exist_ok=True)
    log_file = _quiet_libraries(settings)
    db.upgrade(settings.database_url)
    out.print(f"[bold]moerge demo[/bold]  MOERGE_HOME={settings.home}  engine={settings.engine}")
    out.print(f"library logs: {log_file}", highlight=False)
    say = lambda line: out.print(line, highlight=False)  # noqa: E731
    with out.status("converting SmolLM2 and registering the base and the experts trained before"):
        state = run(prepare_demo(settings, say))
    key_file = settings.home / "admin-key"
    if state.secret is not None and not settings.admin_key:
        # The demo keeps its key (owner-only) so a second run can print it again.
        key_file.write_text(state.secret + "\n")
        key_file.chmod(0o600)
    key = settings.admin_key or (key_file.read_text().strip() if key_file.exists() else None)
    if not serve_api:  # train what is missing here and now, then stop
        if state.training:
            from api.demo import sync_auto

            out.print(f"training {len(state.training)} experts in this process", highlight=False)
            run(_run_worker(settings, drain=True, kinds=["train"]))
            run(sync_auto(settings, say))
        out.print(f"admin key: {'$MOERGE_ADMIN_KEY' if settings.admin_key else key_file}", highlight=False)
        return
    # The API's own worker runs merges and fits; training has a worker process of its own at a lower priority.
    thread, server = serve_in_thread(settings, worker_kinds=("merge", "fit"))
    training = BackgroundTraining(settings, state.training, say) if state.training else None
    base = f"http://{settings.host}:{settings.port}"
    try:
        if samples:  # the base answers first (vLLM starts with the CPU to itself), then the experts train
            _demo_samples(base, key, state.experts)
        if training is not None:
            training.start()
        model = "auto" if state.experts else "smollm2-135m-instruct"
        _ready_lines(settings, base, key_file, model, state, training)
        _serve_until_stopped(thread, server)
    finally:
        if training is not None:
            training.stop()


def _quiet_libraries(settings: Settings) -> Path:
    """Library noise (warnings, INFO lines, progress bars) goes to ``MOERGE_HOME/logs/demo.log``, not the
    terminal; moerge's own lines stay."""
    import logging
    import warnings

    logs = settings.home / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    path = logs / "demo.log"
    _keep_logs_in(path)
    logging.captureWarnings(True)  # TracerWarnings, the ONNX exporter's UserWarnings: into the log
    warnings.simplefilter("default")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # "Loading weights: 100%"
    except ImportError:  # transformers is a dependency; only a broken install lacks it
        pass
    if not out.is_terminal:  # a log file: no wrapping at 80 columns
        out.width = 200
    return path


def _keep_logs_in(path: Path) -> None:
    """The root logger writes to ``path`` only (the app, as it starts, installs a console handler of its own)."""
    import logging

    root = logging.getLogger()
    for existing in list(root.handlers):
        if not (isinstance(existing, logging.FileHandler) and Path(existing.baseFilename) == path):
            root.removeHandler(existing)
    if not root.handlers:
        handler = logging.FileHandler(path)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)
    root.setLevel(logging.INFO)


def _demo_samples(base: str, key: str | None, experts: list[Any]) -> None:
    from api.client import ApiClient

    client = ApiClient(base, key)
    with out.status("starting vLLM for the base (about a minute the first time)"):
        client.wait_ready("smollm2-135m-instruct")
    table = Table(
        "model",
        "query",
        "answer",
        "expected",
        "`auto` routed to",
        title="one sample query per served expert (eval split), then the same query to `auto`",
    )
    if not experts:
        messages = [{"role": "user", "content": "What is the capital of France?"}]
        answer, _ = client.chat(
            {"model": "smollm2-135m-instruct", "max_tokens": 32, "temperature": 0, "messages": messages}
        )
        table.add_row(
            "smollm2-135m-instruct", messages[0]["content"], answer["choices"][0]["message"]["content"], "", ""
        )
    for expert in experts:
        messages = [{"role": "user", "content": expert.sample_prompt}]
        answer, _ = client.chat({"model": expert.slug, "max_tokens": 32, "temperature": 0, "messages": messages})
        routed, headers = client.chat({"model": "auto", "max_tokens": 32, "temperature": 0, "messages": messages})
        table.add_row(
            expert.slug,
            expert.sample_prompt,
            answer["choices"][0]["message"]["content"],
            expert.sample_answer,
            f"{headers.get('x-moerge-experts', '')}: {routed['choices'][0]['message']['content']}",
        )
    out.print(table)


def _ready_lines(settings: Settings, base: str, key_file: Path, model: str, state: Any, training: Any) -> None:
    """What a newcomer needs, once: where things are and two calls that work as printed."""
    key_expr = "$MOERGE_ADMIN_KEY" if settings.admin_key else f"$(cat {key_file})"
    key_py = "os.environ['MOERGE_ADMIN_KEY']" if settings.admin_key else f"open('{key_file}').read().strip()"
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "What is 12 + 30?"}], "max_tokens": 32})
    lines = [
        "",
        "[bold]moerge is serving[/bold]",
        f"  admin panel  {base}/admin  (sign in with the admin key)",
        f"  OpenAI API   {base}/v1",
        f"  admin key    {'in $MOERGE_ADMIN_KEY' if settings.admin_key else key_file}",
        "  try it:",
        f'    curl -s {base}/v1/chat/completions -H "Authorization: Bearer {key_expr}" '
        f"-H 'content-type: application/json' -d '{body}'",
        f"    {sys.executable} -c \"import os, openai; c = openai.OpenAI(base_url='{base}/v1', api_key={key_py}); "
        f"print(c.chat.completions.create(model='{model}', "
        "messages=[{'role': 'user', 'content': 'What is 12 + 30?'}], max_tokens=32).choices[0].message.content)\"",
    ]
    if training is not None:
        lines.append(
            f"  experts      {len(state.experts)} served; {len(state.training)} training in the background "
            "(moerge jobs list, or the admin panel's dashboard); each joins `auto` once trained"
        )
    lines.append("Ctrl-C to stop")
    for line in lines:
        bold = line.startswith("[bold]")  # the heading is the only markup: the calls hold brackets
        out.print(line, highlight=False, soft_wrap=True, markup=bold)


def _serve_until_stopped(thread: Any, server: Any) -> None:
    # The server runs in a thread, so its own signal handlers are not installed: stop it from here, so that
    # its shutdown closes the engine and the vLLM servers it started (a bare exit would orphan them).
    def stop(_signum: int, _frame: object) -> None:
        server.should_exit = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    while thread.is_alive():
        thread.join(timeout=0.5)


@app.command()
@handles_errors
def query(
    model: Annotated[str, typer.Argument(help="a base, adapter, merged model or composition")],
    text: Annotated[str, typer.Argument(help="the user message")],
    max_tokens: Annotated[int, typer.Option(help="most tokens to generate")] = 256,
    temperature: Annotated[float, typer.Option(help="0 = greedy")] = 0.0,
    stream: Annotated[bool, typer.Option("--stream/--no-stream", help="print tokens as they come")] = True,
    show_route: Annotated[bool, typer.Option("--route", help="print the x-moerge-* routing headers")] = False,
) -> None:
    """Ask a running moerge server (MOERGE_URL, key from MOERGE_API_KEY or $MOERGE_HOME/admin-key)."""
    from api.client import ApiClient

    settings = Settings.from_env()
    client = ApiClient(settings.api_url, settings.api_key)
    body = {
        "model": model,
        "messages": [{"role": "user", "content": text}],
        "max_tokens": max_tokens,
        "temperature": temperature,
    }
    if stream:
        headers = client.chat_stream(body, on_text=lambda piece: (sys.stdout.write(piece), sys.stdout.flush()))
        sys.stdout.write("\n")
    else:
        answer, headers = client.chat(body)
        sys.stdout.write(answer["choices"][0]["message"]["content"] + "\n")
    if show_route:
        for name in sorted(h for h in headers if h.startswith("x-moerge-")):
            err.print(f"{name}: {headers.get(name, '')}", highlight=False)


@app.command()
@handles_errors
def route(
    composition: Annotated[str, typer.Argument(help="the composition to route for")],
    text: Annotated[str, typer.Argument(help="the query")],
    as_json: Annotated[bool, typer.Option("--json", help="print the decision as JSON")] = False,
) -> None:
    """Show which experts a composition's router picks for a query, and every candidate's score (no generation)."""
    from api.client import ApiClient

    settings = Settings.from_env()
    decision, _ = ApiClient(settings.api_url, settings.api_key).route(composition, text)
    if as_json:
        sys.stdout.write(json.dumps(decision, indent=2) + "\n")
        return
    chosen = {e["slug"]: e["weight"] for e in decision["experts"]}
    table = Table(title=f"{composition}: {decision['router']}" + (" -> fallback" if decision["fallback"] else ""))
    for column in ("expert", "score", "weight"):
        table.add_column(column)
    for slug, score in sorted(decision["scores"].items(), key=lambda kv: kv[1], reverse=True):
        weight = chosen.get(slug)
        table.add_row(slug, f"{score:.4f}", "" if weight is None else f"{weight:.3f}")
    out.print(table)
    for number, part in enumerate(decision.get("extra", {}).get("parts", []), start=1):
        out.print(f"part {number} -> {part['expert'] or 'fallback'}: {part['text']}", highlight=False)
    out.print(f"answered by: {', '.join(decision['answered_by'])}  ({decision['reason']})", highlight=False)


@app.command("eval")
@handles_errors
def eval_models(
    models: Annotated[list[str], typer.Argument(help="models or compositions to evaluate, one row each")],
    task: Annotated[list[str] | None, typer.Option(help="a task name; repeat (default: all tasks)")] = None,
    n: Annotated[int, typer.Option(help="queries per task")] = 100,
    split: Annotated[str, typer.Option(help="eval or heldout")] = "eval",
    out: Annotated[Path, typer.Option(help="folder for eval.md, eval.json, eval.png")] = Path("evals/results/latest"),
    title: Annotated[str, typer.Option(help="title of the table and plot")] = "",
    concurrency: Annotated[int, typer.Option(help="queries in flight")] = 16,
    expert_for: Annotated[
        list[str] | None,
        typer.Option(help="TASK=EXPERT: the task's own expert, for routing accuracy and `oracle` (repeat)"),
    ] = None,
    record: Annotated[
        bool, typer.Option(help="store each expert's per-task accuracy in the registry (its eval results)")
    ] = False,
) -> None:
    """Run models or compositions over the tasks' splits through a running server; write a table, JSON
    and a plot. The model `oracle` sends each query to its task's own expert (default: the demo's
    `<task>-lora`)."""

    from evals.harness import evaluate, markdown_table, write_reports
    from evals.tasks import TASKS, all_task_names

    if split not in ("eval", "heldout"):
        raise fail("split: must be eval or heldout")
    unknown = [t for t in task or [] if t not in all_task_names()]
    if unknown:
        raise fail(f"task: unknown task {unknown[0]!r}; known: {', '.join(all_task_names())}")
    from api.demo import expert_slug

    experts_by_task = {name: expert_slug(name) for name in TASKS.names()}
    experts_by_task.update(_params(expert_for, "--expert-for"))
    settings = Settings.from_env()
    total = n * len(task or TASKS.names()) * len(models)
    with counted("evaluating: queries", total) as advance:
        rows = run(
            evaluate(
                settings.api_url,
                settings.api_key,
                models,
                task_names=task,
                n=n,
                split=split,
                concurrency=concurrency,
                on_done=advance,
                expert_for=experts_by_task,
            )
        )
    paths = write_reports(rows, out, title=title or f"moerge eval ({split} split)", concurrency=concurrency)
    paths.update(_trace_heatmaps(settings, models, task or TASKS.names(), split, out))
    if record:
        from api.client import ApiClient

        client = ApiClient(settings.api_url, settings.api_key)
        experts = [r for r in rows if r.routing_accuracy is None and r.model != "oracle"]
        for r in experts:
            for task_name, value in r.accuracy.items():
                result = {"task": task_name, "metric": "exact_match", "value": value, "split": split}
                client.add_eval(r.model, {**result, "dataset": f"moerge-synthetic/{task_name}"})
        err.print(f"recorded eval results of {len(experts)} expert(s) in the registry", highlight=False)
    sys.stdout.write(markdown_table(rows, title=title, concurrency=concurrency))
    out.mkdir(parents=True, exist_ok=True)
    err.print(f"wrote {', '.join(str(p) for p in paths.values())}", highlight=False)


def _trace_heatmaps(settings: Settings, models: list[str], tasks: list[str], split: str, out: Path) -> dict[str, Path]:
    """For each token-level composition among ``models``: the trace of one sample query (the first of the
    first task) drawn as a heatmap, ``trace-<model>.png``."""
    from evals.harness import fetch_trace, plot_trace
    from evals.tasks import get_task

    sample = get_task(tasks[0]).examples("heldout" if split == "heldout" else "eval", 1)[0].prompt
    drawn: dict[str, Path] = {}
    for model in models:
        found = run(fetch_trace(settings.api_url, settings.api_key, model, sample))
        if found is not None:
            path = out / f"trace-{model}.png"
            plot_trace(found, path, title=f"{model}: adapter with the largest weight per token and layer")
            drawn[f"trace {model}"] = path
    return drawn


# -- experts ------------------------------------------------------------------------------------------
@expert_app.command("add")
@handles_errors
def expert_add(
    path: Annotated[Path, typer.Argument(help="model or LoRA adapter folder (safetensors)")],
    slug: Annotated[str, typer.Option(help="unique name")],
    description: Annotated[str, typer.Option(help="what the expert is")] = "",
    task_description: Annotated[str, typer.Option(help="what it is good at, for routing")] = "",
    skill: Annotated[list[str] | None, typer.Option(help="a skill; repeat")] = None,
    domain: Annotated[list[str] | None, typer.Option(help="a domain; repeat")] = None,
    example: Annotated[list[str] | None, typer.Option(help="an example prompt; repeat")] = None,
    tag: Annotated[list[str] | None, typer.Option(help="a tag; repeat")] = None,
    alias: Annotated[list[str] | None, typer.Option(help="another name; repeat")] = None,
    kind: Annotated[str | None, typer.Option(help="base, adapter, finetune or merged (inferred)")] = None,
    base: Annotated[str | None, typer.Option(help="the registered base (adapters default to their config's)")] = None,
    license: Annotated[str | None, typer.Option(help="licence id")] = None,
    owner: Annotated[str | None, typer.Option(help="owning team or person")] = None,
    chat_template: Annotated[
        str | None,
        typer.Option(help="a model served on its own: a chat template shipped with moerge (e.g. smollm2-tools)"),
    ] = None,
    tool_parser: Annotated[
        str | None, typer.Option(help="a model served on its own: vLLM's tool-call parser (e.g. hermes)")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the record as JSON")] = False,
) -> None:
    """Register a model folder or LoRA adapter from a local path."""
    if not path.is_dir():
        raise fail(f"path: {path} is not a folder")
    spec = ExpertSpec(
        slug=slug,
        description=description,
        task_description=task_description,
        skills=skill or [],
        domains=domain or [],
        example_prompts=example or [],
        tags=tag or [],
        aliases=alias or [],
        kind=kind,
        base=base,
        license=license,
        owner=owner,
        chat_template=chat_template,
        tool_parser=tool_parser,
    )
    settings = Settings.from_env()
    folder = path.resolve()
    expert = run(_with_services(settings, lambda e, _k: e.register_folder(folder, spec, source_uri=f"file://{folder}")))
    if as_json:
        out.print_json(json.dumps(expert_summary(expert)))
    else:
        out.print(
            f"registered {expert.kind} {expert.slug} ({expert.id}), {len(expert.files)} files, "
            f"{expert.total_size / 1e6:.1f} MB"
        )


@expert_app.command("list")
@handles_errors
def expert_list(
    kind: Annotated[str | None, typer.Option(help="filter by kind")] = None,
    base: Annotated[str | None, typer.Option(help="filter by base")] = None,
    skill: Annotated[str | None, typer.Option(help="filter by skill")] = None,
    tag: Annotated[str | None, typer.Option(help="filter by tag")] = None,
    limit: int = 50,
    offset: int = 0,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """List registered experts."""
    settings = Settings.from_env()
    page = run(
        _with_services(
            settings,
            lambda e, _k: e.list_experts(kind=kind, base=base, skill=skill, tag=tag, limit=limit, offset=offset),
        )
    )
    if as_json:
        out.print_json(json.dumps({"data": [expert_summary(x) for x in page.items], "total": page.total}))
        return
    table = Table("slug", "kind", "base", "r", "skills", "size MB", title=f"{page.total} experts")
    for x in page.items:
        table.add_row(
            x.slug,
            x.kind,
            x.base.slug if x.base else "",
            str(x.r or ""),
            ", ".join(x.skills),
            f"{x.total_size / 1e6:.1f}",
        )
    out.print(table)


@expert_app.command("show")
@handles_errors
def expert_show(
    ref: str,
    card: Annotated[bool, typer.Option("--card", help="print the model card")] = False,
) -> None:
    """Show one expert (JSON), or its model card."""
    settings = Settings.from_env()
    expert = run(_with_services(settings, lambda e, _k: e.get(ref)))
    if card:
        sys.stdout.write(render_card(expert))
    else:
        out.print_json(json.dumps(expert_summary(expert)))


@expert_app.command("rm")
@handles_errors
def expert_rm(
    ref: str,
    force: Annotated[bool, typer.Option(help="also drop it from compositions and merge jobs")] = False,
) -> None:
    """Remove an expert and the stored files no other expert uses."""
    settings = Settings.from_env()
    run(_with_services(settings, lambda e, _k: e.delete(ref, force=force)))
    out.print(f"removed {ref}")


@expert_app.command("verify")
@handles_errors
def expert_verify(
    ref: Annotated[str | None, typer.Argument(help="one expert; all when omitted")] = None,
) -> None:
    """Re-hash stored files and report any damage, and LoRA adapters that cannot be served under
    MOERGE_MAX_LORA_RANK or the rules registration now enforces (exit 1 if any)."""
    settings = Settings.from_env()

    async def check(experts: ExpertService) -> tuple[dict[str, list[Damage]], list[dict[str, str]]]:
        return await experts.verify(ref), await experts.unservable(ref)

    report, unservable = run(_with_services(settings, lambda e, _k: check(e)))
    refused = {entry["slug"]: entry for entry in unservable}
    damaged = 0
    for slug, damage in report.items():
        if damage or slug in refused:
            damaged += 1
            for d in damage:
                err.print(f"[red]DAMAGED[/red] {slug}: {d.path} ({d.sha256[:12]}): {d.problem}", highlight=False)
            if slug in refused:
                entry = refused[slug]
                line = f"{slug}: {entry['reason']}; fix: {entry['fix']}"  # a key may hold [brackets]
                err.print(f"[red]UNSERVABLE[/red] {escape(line)}", highlight=False)
        else:
            out.print(f"ok {slug}")
    if damaged:
        raise typer.Exit(1)
    out.print(f"{len(report)} experts verified")


@expert_app.command("training-data")
@handles_errors
def expert_training_data(
    ref: Annotated[str, typer.Argument(help="the expert (slug, id or alias)")],
    file: Annotated[
        Path | None,
        typer.Argument(
            help="JSONL or JSON list of {prompt, answer} or {messages} rows; omit to show the attached data"
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the result as JSON")] = False,
) -> None:
    """Attach training examples to an expert (PHATGOOSE trains its gates on them on first use), or show them."""
    from registry.training_data import TrainingDataService, parse_training_data

    settings = Settings.from_env()
    if file is None:

        async def show(session: AsyncSession, store: ArtifactStore) -> tuple[Any, list[Any]]:
            service = TrainingDataService(session, store)
            return await service.info(ref), await service.rows(ref)

        info, rows = run(_with_session(settings, show))
        if as_json:
            out.print_json(json.dumps({**info.as_dict(), "data": [r.as_json() for r in rows]}))
        else:
            out.print(f"{info.expert}: {info.rows} training rows, {info.size:,} bytes, sha256 {info.sha256[:12]}")
        return
    if not file.is_file():
        raise fail(f"file: {file} is not a file")
    rows = parse_training_data(file.read_bytes())
    attached = run(
        _with_session(settings, lambda session, store: TrainingDataService(session, store).attach(ref, rows))
    )
    if as_json:
        out.print_json(json.dumps(attached.as_dict()))
    else:
        out.print(f"attached {attached.rows} training rows to {attached.expert} (sha256 {attached.sha256[:12]})")


# -- compositions ----------------------------------------------------------------------------------------


def _params(pairs: list[str] | None, option: str) -> dict[str, Any]:
    """`key=value` pairs; a value that parses as JSON (numbers, booleans, lists) is taken as such."""
    params: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise fail(f"{option}: expected KEY=VALUE, got {pair!r}")
        try:
            params[key] = json.loads(raw)
        except json.JSONDecodeError:
            params[key] = raw
    return params


def _cli_fitter(settings: Settings, session: AsyncSession) -> PrepareHook:
    """Fits the router's states now, unless fitting runs models (then the server fits on first query)."""
    from composition.mixtures import router_fitter
    from routers.query import RouterContext
    from routers.query.embedder import LazyEmbedder

    context = RouterContext(
        embedder=LazyEmbedder(settings.embedding_model, settings.embedding_backend, settings.embedding_cache_mb)
    )
    return router_fitter(session, ArtifactStore(settings.store_dir), context, run_models=False)


def _print_composition(data: dict[str, Any], as_json: bool) -> None:
    if as_json:
        out.print_json(json.dumps(data))
        return
    for key, value in data.items():
        out.print(f"{key}: {value}", highlight=False)


Experts = Annotated[list[str] | None, typer.Option("--expert", "-e", help="a candidate expert (repeat)")]
RouterParams = Annotated[list[str] | None, typer.Option("--param", "-p", help="router parameter KEY=VALUE (repeat)")]
AggParams = Annotated[list[str] | None, typer.Option("--agg-param", help="aggregator parameter KEY=VALUE (repeat)")]


@composition_app.command("create")
@handles_errors
def composition_create(
    name: Annotated[str, typer.Argument(help="the composition's name, queried like a model")],
    router: Annotated[
        str,
        typer.Option(
            help="per query: direct, embedding, two_step, skills, kshot, instruct; per token: arrow, phatgoose, glider"
        ),
    ],
    expert: Experts = None,
    param: RouterParams = None,
    k: Annotated[int, typer.Option(help="how many experts answer each query")] = 1,
    aggregator: Annotated[str | None, typer.Option(help="vote, synthesize or select (needed when k > 1)")] = None,
    agg_param: AggParams = None,
    fallback: Annotated[str | None, typer.Option(help="expert that answers when no expert fits")] = None,
    description: Annotated[str, typer.Option(help="what the composition is for")] = "",
    decompose: Annotated[
        bool, typer.Option(help="route each numbered part of a query to its own expert (needs synthesize)")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Create a composition: a router over candidate experts, k, an aggregator and a fallback."""
    spec = CompositionSpec(
        name=name,
        router=router,
        router_params=_params(param, "--param"),
        experts=expert or [],
        k=k,
        aggregator=aggregator,
        aggregator_params=_params(agg_param, "--agg-param"),
        fallback=fallback,
        description=description,
        decompose=decompose,
    )
    settings = Settings.from_env()

    async def work(session: AsyncSession, store: ArtifactStore) -> dict[str, Any]:
        service = CompositionService(session, store)
        return await service.describe(await service.create(spec, prepare=_cli_fitter(settings, session)))

    _print_composition(run(_with_session(settings, work)), as_json)


@composition_app.command("update")
@handles_errors
def composition_update(
    name: Annotated[str, typer.Argument(help="the composition to change")],
    router: Annotated[str | None, typer.Option(help="new router")] = None,
    expert: Experts = None,
    param: RouterParams = None,
    k: Annotated[int | None, typer.Option(help="new k")] = None,
    aggregator: Annotated[str | None, typer.Option(help="new aggregator")] = None,
    agg_param: AggParams = None,
    fallback: Annotated[str | None, typer.Option(help="new fallback expert")] = None,
    description: Annotated[str | None, typer.Option(help="new description")] = None,
    decompose: Annotated[
        bool | None, typer.Option("--decompose/--no-decompose", help="route each numbered part on its own")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Change a composition; options not given keep their values (router parameters are replaced whole)."""
    patch = CompositionPatch(
        router=router,
        router_params=_params(param, "--param") if param else None,
        experts=expert or None,
        k=k,
        aggregator=aggregator,
        aggregator_params=_params(agg_param, "--agg-param") if agg_param else None,
        fallback=fallback,
        description=description,
        decompose=decompose,
    )
    settings = Settings.from_env()

    async def work(session: AsyncSession, store: ArtifactStore) -> dict[str, Any]:
        service = CompositionService(session, store)
        return await service.describe(await service.update(name, patch, prepare=_cli_fitter(settings, session)))

    _print_composition(run(_with_session(settings, work)), as_json)


@composition_app.command("list")
@handles_errors
def composition_list(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """List compositions."""

    async def work(session: AsyncSession, store: ArtifactStore) -> list[dict[str, Any]]:
        service = CompositionService(session, store)
        return [await service.describe(c) for c in await service.list_compositions()]

    rows = run(_with_session(Settings.from_env(), work))
    if as_json:
        out.print_json(json.dumps({"data": rows}))
        return
    table = Table("name", "router", "k", "aggregator", "experts", "fallback", title=f"{len(rows)} compositions")
    for c in rows:
        table.add_row(
            c["name"], c["router"], str(c["k"]), c["aggregator"] or "", ", ".join(c["experts"]), c["fallback"] or ""
        )
    out.print(table)


@composition_app.command("show")
@handles_errors
def composition_show(
    name: Annotated[str, typer.Argument(help="the composition")],
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Show one composition."""

    async def work(session: AsyncSession, store: ArtifactStore) -> dict[str, Any]:
        service = CompositionService(session, store)
        return await service.describe(await service.get(name))

    _print_composition(run(_with_session(Settings.from_env(), work)), as_json)


@composition_app.command("rm")
@handles_errors
def composition_rm(name: Annotated[str, typer.Argument(help="the composition")]) -> None:
    """Remove a composition (its experts stay registered)."""

    async def work(session: AsyncSession, store: ArtifactStore) -> None:
        await CompositionService(session, store).delete(name)

    run(_with_session(Settings.from_env(), work))
    out.print(f"removed composition {name}")


# -- merges ----------------------------------------------------------------------------------------------
CONFIG_SUFFIXES = {".yaml": True, ".yml": True, ".json": False}  # suffix -> is YAML


@app.command()
@handles_errors
def merge(
    config: Annotated[Path, typer.Argument(help="merge config: mergekit-style YAML (.yaml, .yml) or JSON (.json)")],
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="also write the merged model folder here (new or empty)")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the finished job as JSON")] = False,
) -> None:
    """Merge experts as CONFIG says, in this process with a progress bar, and register the result as a
    `merged` expert (the same job, checks and code as `POST /api/merges`)."""
    yaml_text = CONFIG_SUFFIXES.get(config.suffix.lower())
    if yaml_text is None:
        raise fail(f"config: {config} is not a .yaml, .yml or .json file")
    if not config.is_file():
        raise fail(f"config: {config} is not a file")
    if output is not None and output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise fail(f"output: {output} exists and is not an empty folder")
    raw = config.read_text()
    settings = Settings.from_env()
    summary, folder = run(
        _with_sessionmaker(settings, lambda sm, store: _run_merge(settings, sm, store, raw, yaml_text))
    )
    if output is not None:
        _copy_folder(folder, output)
    if as_json:
        out.print_json(json.dumps(summary))
        return
    result = summary["result_expert"]
    out.print(f"registered merged expert {result['slug']} ({result['id']}), job {summary['id']}", highlight=False)
    if output is not None:
        out.print(f"wrote {output}", highlight=False)


async def _run_merge(
    settings: Settings, sessionmaker: async_sessionmaker[AsyncSession], store: ArtifactStore, raw: str, yaml_text: bool
) -> tuple[dict[str, Any], Path]:
    """Submit the job already claimed by this process (no server's worker takes it), run it, return its
    summary and the registered expert's folder."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from jobs.factory import make_worker
    from jobs.worker import worker_name
    from merging.jobs import MergeJobService
    from registry.jobs import job_name

    me = worker_name()
    async with sessionmaker() as session:
        job = await MergeJobService(session, store).submit_merge(raw, yaml_text=yaml_text, claimed_by=me)
    runner = make_worker(sessionmaker, store, settings, name=me)
    columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.percentage:>5.1f}%"))
    with Progress(*columns, TimeElapsedColumn(), console=err) as progress:
        bar = progress.add_task(f"merge {job_name(job)}", total=1.0)
        job = await runner.run_job(
            job.id, on_tick=lambda done, message: progress.update(bar, completed=done, description=message[:60])
        )
    async with sessionmaker() as session:
        summary = await MergeJobService(session, store).describe(job)
    if job.status != "succeeded":
        raise MoergeError(f"merge job {job.id} {job.status}: {job.error or job.message}")
    assert job.result_expert_id is not None
    return summary, store.expert_dir(job.result_expert_id)


def _copy_folder(source: Path, dest: Path) -> None:
    """Copy a stored expert's folder (hard links to read-only blobs) as plain files, whole or not at all."""
    import shutil
    import uuid

    partial = dest.parent / f".{dest.name}.partial-{uuid.uuid4().hex[:8]}"
    try:
        shutil.copytree(source, partial, copy_function=shutil.copyfile)
        if dest.exists():
            dest.rmdir()  # checked empty before the merge
        partial.rename(dest)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise


def _job_service(kind: str | None, work: Callable[[JobService], Awaitable[T]]) -> T:
    from registry.jobs import JobService

    return run(_with_session(Settings.from_env(), lambda session, _store: work(JobService(session, kind=kind))))


def _jobs_list(kind: str | None, status: str | None, limit: int, offset: int, as_json: bool) -> None:
    async def work(jobs: JobService) -> dict[str, Any]:
        page = await jobs.list_jobs(status=status, limit=limit, offset=offset)
        return {"data": await jobs.describe_many(page.items), "total": page.total}

    listing = _job_service(kind, work)
    if as_json:
        out.print_json(json.dumps(listing))
        return
    table = Table(
        "id", "kind", "name", "method", "status", "progress", "result", "created", title=f"{listing['total']} jobs"
    )
    for j in listing["data"]:
        result = j["result_expert"]["slug"] if j["result_expert"] else (j["error"] or j["message"] or "")[:60]
        progress = f"{100 * j['progress']:.0f}%"
        table.add_row(j["id"], j["kind"], j["name"], j["method"], j["status"], progress, result, j["created_at"][:19])
    out.print(table)


def _jobs_show(kind: str | None, job_id: str) -> None:
    async def work(jobs: JobService) -> dict[str, Any]:
        return await jobs.describe(await jobs.get(job_id))

    out.print_json(json.dumps(_job_service(kind, work)))


def _jobs_cancel(kind: str | None, job_id: str) -> None:
    async def work(jobs: JobService) -> dict[str, Any]:
        return await jobs.describe(await jobs.cancel(job_id))

    job = _job_service(kind, work)
    out.print(f"{job['kind']} job {job['id']}: {job['status']} ({job['message']})", highlight=False)


STATUS_HELP = "queued, running, succeeded, failed or cancelled"
JobId = Annotated[str, typer.Argument(help="the job's id")]


@jobs_app.command("list")
@handles_errors
def jobs_list(
    status: Annotated[str | None, typer.Option(help=STATUS_HELP)] = None,
    kind: Annotated[str | None, typer.Option(help="merge, train or fit")] = None,
    limit: int = 50,
    offset: int = 0,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """List jobs (merges, training, fitting), newest first."""
    _jobs_list(kind, status, limit, offset, as_json)


@jobs_app.command("show")
@handles_errors
def jobs_show(job_id: JobId) -> None:
    """Show one job (JSON)."""
    _jobs_show(None, job_id)


@jobs_app.command("cancel")
@handles_errors
def jobs_cancel(job_id: JobId) -> None:
    """Cancel a queued job, or ask a running one to stop at its next chance."""
    _jobs_cancel(None, job_id)


@merges_app.command("list")
@handles_errors
def merges_list(
    status: Annotated[str | None, typer.Option(help=STATUS_HELP)] = None,
    limit: int = 50,
    offset: int = 0,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """List merge jobs, newest first (`moerge jobs list --kind merge`)."""
    _jobs_list("merge", status, limit, offset, as_json)


@merges_app.command("show")
@handles_errors
def merges_show(job_id: JobId) -> None:
    """Show one merge job (JSON)."""
    _jobs_show("merge", job_id)


@merges_app.command("cancel")
@handles_errors
def merges_cancel(job_id: JobId) -> None:
    """Cancel a queued merge, or ask a running one to stop at its next tensor."""
    _jobs_cancel("merge", job_id)


def main() -> None:
    import logging

    # Libraries' tqdm bars (the GGUF conversion's, for one) are a progress bar on a terminal but fill a log with
    # redraws: off when stderr is not a terminal. tqdm reads this when first imported, so before anything does.
    if not sys.stderr.isatty():
        os.environ.setdefault("TQDM_DISABLE", "1")
    from evals.sources import install_example_sources

    install_example_sources()  # the demo's tasks, named by `mixer`'s `task` (`composition create -p task=...`)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # one line per engine call drowns the server log; keep httpx to warnings
    for name in ("httpx", "httpx2"):
        logging.getLogger(name).setLevel(logging.WARNING)
    app()


if __name__ == "__main__":
    main()
