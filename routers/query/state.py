"""Fitted router state, stored per (router, config hash, expert) and refitted only when an expert changes.

States are dicts of JSON values and numpy arrays, packed with msgpack (arrays as dtype + shape + bytes).
The database row is the durable copy (shared by every replica); a process-wide memo keyed by the
expert's fingerprint spares the database read on the hot path, and ``prepare``'s result is memoized per
candidate set, so a routing decision neither refits nor restacks anything.
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import msgspec
import numpy as np
from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from registry.models import RouterState
from routers.query.base import Candidate, GlobalRouter

_ARRAY_KEY = "__ndarray__"


def _pack_default(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        return {_ARRAY_KEY: [str(obj.dtype), list(obj.shape), np.ascontiguousarray(obj).tobytes()]}
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"router state values must be JSON values or numpy arrays, not {type(obj).__name__}")


def _unpack(obj: Any) -> Any:
    if isinstance(obj, dict):
        if _ARRAY_KEY in obj and len(obj) == 1:
            dtype, shape, raw = obj[_ARRAY_KEY]
            return np.frombuffer(raw, dtype=np.dtype(dtype)).reshape(shape).copy()
        return {k: _unpack(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_unpack(v) for v in obj]
    return obj


def encode_state(state: dict[str, Any]) -> bytes:
    return msgspec.msgpack.encode(state, enc_hook=_pack_default)


def decode_state(payload: bytes) -> dict[str, Any]:
    decoded: dict[str, Any] = _unpack(msgspec.msgpack.decode(payload))
    return decoded


class LRU:
    """A small thread-safe LRU memo."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.items: OrderedDict[Any, Any] = OrderedDict()
        self.lock = threading.Lock()

    def get(self, key: Any) -> Any:
        with self.lock:
            if key not in self.items:
                return None
            self.items.move_to_end(key)
            return self.items[key]

    def put(self, key: Any, value: Any) -> None:
        with self.lock:
            self.items[key] = value
            self.items.move_to_end(key)
            while len(self.items) > self.size:
                self.items.popitem(last=False)

    def clear(self) -> None:
        with self.lock:
            self.items.clear()


_STATES = LRU(200_000)  # (router, config hash, expert id, fingerprint) -> state
_PREPARED = LRU(256)  # (router, config hash, ((expert id, fingerprint), ...)) -> prepared


_INFLIGHT: dict[tuple[str, str, str, str], asyncio.Future[dict[str, Any]]] = {}


async def _fit_once(router: GlobalRouter, config_hash: str, cand: Candidate) -> dict[str, Any]:
    """``router.fit_expert(cand)``, shared by every caller that asks while it runs."""
    key = (router.name, config_hash, cand.id, cand.fingerprint)
    running = _INFLIGHT.get(key)
    if running is not None and running.get_loop() is asyncio.get_running_loop():
        return await asyncio.shield(running)
    future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
    _INFLIGHT[key] = future
    try:
        state = await router.fit_expert(cand)
    except asyncio.CancelledError:
        future.cancel()
        raise
    except BaseException as exc:
        future.set_exception(exc)
        future.exception()  # retrieved here, so an unawaited failure is not reported twice
        raise
    finally:
        if _INFLIGHT.get(key) is future:
            del _INFLIGHT[key]
    future.set_result(state)
    return state


class RouterStateStore:
    """Loads, fits and saves per-expert router states; see the module docstring."""

    def __init__(self, session: AsyncSession) -> None:
        self.session = session
        self.fitted: list[str] = []  # slugs fitted by the last call (for logs and tests)

    async def states(
        self,
        router: GlobalRouter,
        candidates: Sequence[Candidate],
        on_fitted: Callable[[int, int], None] | None = None,
    ) -> list[dict[str, Any]]:
        """Every candidate's state, fitting (and saving) the ones missing or stale; ``on_fitted(done, total)``
        as each one is fitted (a progress report)."""
        config_hash = router.config.digest()
        keys = [(router.name, config_hash, c.id, c.fingerprint) for c in candidates]
        found: dict[str, dict[str, Any]] = {}
        for cand, key in zip(candidates, keys, strict=True):
            memo = _STATES.get(key)
            if memo is not None:
                found[cand.id] = memo
        missing = [c for c in candidates if c.id not in found]
        self.fitted = []
        if missing:
            rows = {
                str(row.expert_id): row
                for row in await self.session.scalars(
                    select(RouterState).where(
                        RouterState.router == router.name,
                        RouterState.config_hash == config_hash,
                        RouterState.expert_id.in_([uuid.UUID(c.id) for c in missing]),
                    )
                )
            }
            stored = {cid: (row.fingerprint, row.payload) for cid, row in rows.items()}
            stale = [c for c in missing if stored.get(c.id, ("", b""))[0] != c.fingerprint]
            if stale:
                # Fitting may run models for a long time: hold no database connection meanwhile (requests
                # waiting at once would exhaust the pool the model calls need).
                await self.session.close()
            # Stale experts are fitted concurrently (a router that runs models batches their requests), and
            # each one once however many requests ask for it at the same moment.
            done = 0

            async def fit(cand: Candidate) -> dict[str, Any]:
                nonlocal done
                state = await _fit_once(router, config_hash, cand)
                done += 1
                if on_fitted is not None:
                    on_fitted(done, len(stale))
                return state

            states = await asyncio.gather(*(fit(c) for c in stale))
            fitted = dict(zip([c.id for c in stale], states, strict=True))
            for cand in missing:
                state = fitted[cand.id] if cand.id in fitted else decode_state(stored[cand.id][1])
                found[cand.id] = state
                _STATES.put((router.name, config_hash, cand.id, cand.fingerprint), state)
            if stale:
                await self._save(router.name, config_hash, stale, fitted)
                self.fitted = [c.slug for c in stale]
        return [found[c.id] for c in candidates]

    async def _save(
        self, router: str, config_hash: str, stale: Sequence[Candidate], fitted: dict[str, dict[str, Any]]
    ) -> None:
        ids = [uuid.UUID(c.id) for c in stale]
        try:
            await self.session.execute(
                delete(RouterState).where(
                    RouterState.router == router, RouterState.config_hash == config_hash, RouterState.expert_id.in_(ids)
                )
            )
            self.session.add_all(
                RouterState(
                    router=router,
                    config_hash=config_hash,
                    expert_id=uuid.UUID(c.id),
                    fingerprint=c.fingerprint,
                    payload=encode_state(fitted[c.id]),
                )
                for c in stale
            )
            await self.session.commit()
        except IntegrityError:
            # Another replica saved the same expert's state at the same moment: its row is as good.
            await self.session.rollback()

    async def prepared(
        self,
        router: GlobalRouter,
        candidates: Sequence[Candidate],
        on_fitted: Callable[[int, int], None] | None = None,
    ) -> Any:
        """``router.prepare`` over the candidates' states, memoized per candidate set."""
        key = (router.name, router.config.digest(), tuple((c.id, c.fingerprint) for c in candidates))
        memo = _PREPARED.get(key)
        if memo is not None:
            return memo
        prepared = router.prepare(candidates, await self.states(router, candidates, on_fitted))
        _PREPARED.put(key, prepared)
        return prepared
