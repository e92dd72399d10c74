"""Token routers' per-expert states (Arrow prototypes, PHATGOOSE gates) as stored router artifacts.

A state is a dict module -> float32 vector, computed once per expert and kept in the ``router_states`` table
under (router, config hash, expert id) with the fingerprint of what it was computed from; the payload is the
safetensors serialization of the dict. ``router`` and ``config hash`` come from ``TokenRouter.state_key``:
the router that owns the state (``glider`` stores under its local router's name, so it shares the gates or
prototypes) and a hash of only the config fields that change the fit (routing parameters such as top_k do
not). The fingerprint covers the adapter's files (``manifest_sha256``), its base's, and, for routers that
train on data, the sha256 of the expert's attached training data: a changed expert, or new training data,
is refitted on its next use. PHATGOOSE gates are therefore trained on first use, here, not when the data is
attached.

A router that trains one state for a whole expert set (``joint``, e.g. ``mixer``, trained on the
composition's own examples) stores it the same way, one row per expert, but under a hash of its config, of
the sorted expert ids and of its training examples, and with one fingerprint over every expert's: it is
fitted once for the set and refitted, for all of them, when any of them (or the examples) changes.

Fitting is CPU heavy: it runs in a worker thread (one fit at a time per process: two fits would only share
the two cores), never on the event loop, and without holding a database connection. Concurrent callers in
one process share one fit of the same state; callers in other processes (replicas) may fit it too, and the
first to commit wins: the table's unique constraint refuses the second insert, which is then rolled back and
the stored row is used.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors
from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from core.errors import ValidationFailed
from registry.models import Expert, ExpertKind, ExpertTrainingData, RouterState
from registry.store import ArtifactStore
from registry.training_data import TrainingDataService
from routers.query.state import LRU
from routers.token.base import TOKEN_ROUTERS, FitContext, TokenRouter
from serving.mixture.adapters import AdapterRefused, load_lora_adapter

State = dict[str, torch.Tensor]
T = TypeVar("T")

_MEMO = LRU(4096)  # (router, config hash, expert id, fingerprint) -> state
_INFLIGHT: dict[tuple[str, str, str, str], asyncio.Future[Any]] = {}
_FIT_LOCK = threading.Lock()  # one CPU-heavy fit at a time in this process


def encode_state(state: State) -> bytes:
    """safetensors bytes of a module -> float32 vector dict."""
    return save_tensors({k: v.detach().to(torch.float32).contiguous() for k, v in state.items()})


def decode_state(payload: bytes) -> State:
    return dict(load_tensors(payload))


@dataclass(frozen=True)
class _Job:
    """What fitting one expert needs, read from the database before the session is let go."""

    index: int
    expert_id: str
    slug: str
    fingerprint: str
    adapter_dir: Path
    base_dir: Path
    data_sha: str | None


def _fingerprint(expert: Expert, data_sha: str | None) -> str:
    base_manifest = expert.base.manifest_sha256 if expert.base is not None else ""
    payload = f"{expert.manifest_sha256}\0{base_manifest}\0{data_sha or ''}"
    return hashlib.sha256(payload.encode()).hexdigest()


class TokenStateStore:
    """Loads, fits and saves token routers' per-expert states; see the module docstring."""

    def __init__(self, session: AsyncSession, store: ArtifactStore) -> None:
        self.session = session
        self.store = store
        self.fitted: list[str] = []  # slugs this store fitted in its last call (logs, tests)

    async def states(
        self,
        router: TokenRouter | str,
        experts: Sequence[Expert],
        params: dict[str, Any] | None = None,
        *,
        check_only: bool = False,
        on_fitted: Callable[[int, int], None] | None = None,
        on_step: Callable[[int, int, float], None] | None = None,
    ) -> list[State]:
        """The state of every expert in ``experts`` (registered adapters), in order; missing or stale ones
        are fitted (in a thread) and stored. ``router`` is a built TokenRouter or a name (with ``params``).
        ValidationFailed(param ``experts[i]``) names an expert that is not an adapter, or that lacks the
        training data the router needs. ``check_only``: those checks alone (nothing fitted; returns []).
        ``on_fitted(done, total)`` after each expert fitted here, ``on_step(step, steps, loss)`` during a router
        trained for the whole set (``mixer``): progress reports."""
        if isinstance(router, str):
            router = TOKEN_ROUTERS.build(router, params or {})
        owner, config_hash = router.state_key()
        needs_data = router.requires_training_data()
        data_rows: dict[uuid.UUID, str] = {}
        if needs_data and experts:
            found = await self.session.scalars(
                select(ExpertTrainingData).where(ExpertTrainingData.expert_id.in_([e.id for e in experts]))
            )
            data_rows = {row.expert_id: row.sha256 for row in found}
        jobs: list[_Job] = []
        for i, expert in enumerate(experts):
            if expert.kind not in (ExpertKind.adapter.value, ExpertKind.merged.value) or expert.base_id is None:
                raise ValidationFailed(
                    f"{expert.slug!r} is a {expert.kind}, not a LoRA adapter: token routers mix adapters of one base",
                    param=f"experts[{i}]",
                )
            data_sha = data_rows.get(expert.id) if needs_data else None
            if needs_data and data_sha is None:
                raise ValidationFailed(
                    f"router {router.name!r} trains on each expert's data and {expert.slug!r} has none: attach it "
                    f"with POST /api/experts/{expert.slug}/training-data (or `moerge expert training-data`)",
                    param=f"experts[{i}]",
                    code="no_training_data",
                )
            jobs.append(
                _Job(
                    i,
                    str(expert.id),
                    expert.slug,
                    _fingerprint(expert, data_sha),
                    self.store.expert_dir(expert.id),
                    self.store.expert_dir(expert.base_id),
                    data_sha,
                )
            )

        if check_only:
            return []
        if router.joint:
            return await self._joint_states(router, owner, config_hash, jobs, on_step)

        out: dict[int, State] = {}
        for job in jobs:
            memo = _MEMO.get((owner, config_hash, job.expert_id, job.fingerprint))
            if memo is not None:
                out[job.index] = memo
        missing = [j for j in jobs if j.index not in out]
        self.fitted = []
        if not missing:
            return [out[j.index] for j in jobs]

        rows = await self._stored(owner, config_hash, [j.expert_id for j in missing])
        stale: list[_Job] = []
        for job in missing:
            row = rows.get(job.expert_id)
            if row is not None and row.fingerprint == job.fingerprint:
                out[job.index] = decode_state(row.payload)
                _MEMO.put((owner, config_hash, job.expert_id, job.fingerprint), out[job.index])
            else:
                stale.append(job)
        if not stale:
            return [out[j.index] for j in jobs]

        # Fitting takes seconds to minutes: hold no database connection meanwhile.
        await self.session.close()
        for done, job in enumerate(stale, start=1):
            state, mine = await self._fit_once(router, owner, config_hash, job)
            if on_fitted is not None:
                on_fitted(done, len(stale))
            out[job.index] = state
            if mine:  # a caller that waited for another's fit leaves the saving to that one
                await self._save(owner, config_hash, job, state)
            _MEMO.put((owner, config_hash, job.expert_id, job.fingerprint), state)
        return [out[j.index] for j in jobs]

    async def _stored(self, owner: str, config_hash: str, expert_ids: list[str]) -> dict[str, RouterState]:
        """The stored rows of these experts under (owner, config hash), by expert id."""
        found = await self.session.scalars(
            select(RouterState).where(
                RouterState.router == owner,
                RouterState.config_hash == config_hash,
                RouterState.expert_id.in_([uuid.UUID(i) for i in expert_ids]),
            )
        )
        return {str(row.expert_id): row for row in found}

    async def _fit_once(self, router: TokenRouter, owner: str, config_hash: str, job: _Job) -> tuple[State, bool]:
        """Fit ``job`` in a worker thread, shared by every caller in this process that asks meanwhile; returns
        the state and whether this caller ran the fit."""

        async def fit() -> State:
            examples = (
                await asyncio.to_thread(TrainingDataService(self.session, self.store).read, job.data_sha)
                if job.data_sha is not None
                else []
            )
            return await asyncio.to_thread(_fit, router, job, examples)

        state, mine = await _shared((owner, config_hash, job.expert_id, job.fingerprint), fit)
        if mine:
            self.fitted.append(job.slug)
        return state, mine

    async def _joint_states(
        self,
        router: TokenRouter,
        owner: str,
        config_hash: str,
        jobs: list[_Job],
        on_step: Callable[[int, int, float], None] | None = None,
    ) -> list[State]:
        """States of a router trained for the whole expert set at once (``mixer``): stored one row per expert
        under a hash of the config, the set of experts and the training examples, with a fingerprint of
        every expert's, so a change to any of them refits them all (in one fit)."""
        if len({j.base_dir for j in jobs}) > 1:
            raise ValidationFailed(f"router {router.name!r} mixes adapters of one base only", param="experts")
        digest = router.examples_digest()
        ids = sorted(j.expert_id for j in jobs)
        set_hash = hashlib.sha256("\0".join([config_hash, digest, *ids]).encode()).hexdigest()[:16]
        by_id = {j.expert_id: j for j in jobs}
        fingerprint = hashlib.sha256("\0".join(by_id[i].fingerprint for i in ids).encode()).hexdigest()
        memo = [_MEMO.get((owner, set_hash, j.expert_id, fingerprint)) for j in jobs]
        self.fitted = []
        if all(m is not None for m in memo):
            return [m for m in memo if m is not None]
        rows = await self._stored(owner, set_hash, ids)
        if all(i in rows and rows[i].fingerprint == fingerprint for i in ids):
            states = [decode_state(rows[j.expert_id].payload) for j in jobs]
        else:
            await self.session.close()  # the fit takes minutes: hold no database connection meanwhile
            states, mine = await _shared(
                (owner, set_hash, ",".join(ids), fingerprint),
                lambda: asyncio.to_thread(_fit_joint, router, jobs, on_step),
            )
            if mine:
                self.fitted = [j.slug for j in jobs]
                for job, state in zip(jobs, states, strict=True):
                    await self._save(owner, set_hash, replace(job, fingerprint=fingerprint), state)
        for job, state in zip(jobs, states, strict=True):
            _MEMO.put((owner, set_hash, job.expert_id, fingerprint), state)
        return states

    async def _save(self, owner: str, config_hash: str, job: _Job, state: State) -> None:
        expert_id = uuid.UUID(job.expert_id)
        try:
            # A row for an older fingerprint (the expert or its data changed) is replaced.
            await self.session.execute(
                delete(RouterState).where(
                    RouterState.router == owner,
                    RouterState.config_hash == config_hash,
                    RouterState.expert_id == expert_id,
                    RouterState.fingerprint != job.fingerprint,
                )
            )
            self.session.add(
                RouterState(
                    router=owner,
                    config_hash=config_hash,
                    expert_id=expert_id,
                    fingerprint=job.fingerprint,
                    payload=encode_state(state),
                )
            )
            await self.session.commit()
        except IntegrityError:
            # Another caller (another replica) stored this state at the same moment: its row is as good.
            await self.session.rollback()


async def _shared(key: tuple[str, str, str, str], fit: Callable[[], Awaitable[T]]) -> tuple[T, bool]:
    """Run ``fit`` once for every caller in this process (on this loop) asking for ``key`` meanwhile; returns
    its result and whether this caller ran it."""
    loop = asyncio.get_running_loop()
    running = _INFLIGHT.get(key)
    if running is not None and running.get_loop() is loop:
        return await asyncio.shield(running), False
    future: asyncio.Future[Any] = loop.create_future()
    _INFLIGHT[key] = future
    try:
        result = await fit()
    except asyncio.CancelledError:
        future.cancel()
        raise
    except BaseException as exc:
        future.set_exception(exc)
        future.exception()  # retrieved, so an unawaited failure is not reported twice
        raise
    finally:
        if _INFLIGHT.get(key) is future:
            del _INFLIGHT[key]
    future.set_result(result)
    return result, True


def _fit_joint(
    router: TokenRouter, jobs: Sequence[_Job], on_step: Callable[[int, int, float], None] | None = None
) -> list[State]:
    adapters = []
    for job in jobs:
        try:
            adapters.append(load_lora_adapter(job.adapter_dir, job.slug))
        except AdapterRefused as exc:
            raise ValidationFailed(str(exc), param=f"experts[{job.index}]") from exc
    context = FitContext(base_dir=jobs[0].base_dir, on_step=on_step)
    with _FIT_LOCK:
        states = router.fit_composition(adapters, context)
    return [{k: v.detach().to(torch.float32).contiguous() for k, v in s.items()} for s in states]


def _fit(router: TokenRouter, job: _Job, examples: Sequence[Any]) -> State:
    try:
        adapter = load_lora_adapter(job.adapter_dir, job.slug)
    except AdapterRefused as exc:
        raise ValidationFailed(str(exc), param=f"experts[{job.index}]") from exc
    context = FitContext(base_dir=job.base_dir, examples=examples)
    with _FIT_LOCK:
        state = router.fit_adapter(adapter, context)
    return {k: v.detach().to(torch.float32).contiguous() for k, v in state.items()}


async def token_router_states(
    session: AsyncSession,
    store: ArtifactStore,
    router: str,
    params: dict[str, Any] | None,
    experts: Sequence[Expert],
    *,
    check_only: bool = False,
    on_fitted: Callable[[int, int], None] | None = None,
    on_step: Callable[[int, int, float], None] | None = None,
) -> list[State]:
    """The states of ``experts`` for token router ``router`` with ``params`` (one per expert, in order),
    fitting and storing the missing ones: what the serving layer calls before ``apply_mixture(..., states=)``.
    The session is closed (its connection released) before any fit; the expert rows stay usable.
    ``check_only``: the experts checked for this router, nothing fitted."""
    return await TokenStateStore(session, store).states(
        router, experts, params, check_only=check_only, on_fitted=on_fitted, on_step=on_step
    )


def clear_memo() -> None:
    """Forget the process-wide memo (tests; a memo is only ever a copy of a stored row)."""
    _MEMO.clear()
