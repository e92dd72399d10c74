"""Training examples attached to a registered expert: parsing, validation, storage and reading back.

A user attaches the data an expert was trained on (``POST /api/experts/{ref}/training-data``, ``moerge
expert training-data REF FILE``); PHATGOOSE trains the expert's gate vectors on it. The body is JSONL (one
row per line) or a JSON list; each row is either ``{"prompt": str, "answer": str}`` (one user turn and the
answer) or ``{"messages": [{"role", "content"}, ...]}`` whose last message is the assistant's answer. Every
row is checked before anything is stored, and an error names the line (JSONL) or index (JSON list) and the
field. The rows are kept as canonical JSONL in the content-addressed store (one blob per distinct data set)
with one ``expert_training_data`` row per expert; sending new data replaces the old.

Gates are not trained here: ``routers/token/states.py`` trains them on first use (the first time a
``phatgoose`` or ``glider`` mixture over the expert asks for its state), and the expert's state fingerprint
covers the data's sha256, so new data means new gates.
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from core.errors import Conflict, NotFound, PayloadTooLarge, ValidationFailed
from registry.models import Expert, ExpertFile, ExpertTrainingData, utcnow
from registry.store import ArtifactStore

MAX_TRAINING_DATA_BYTES = 64 * 1024 * 1024
MAX_ROWS = 200_000
ROLES = ("system", "user", "assistant")
PARAM = "training_data"


@dataclass(frozen=True)
class TrainingRow:
    """One example: the chat turns before the answer (``messages``) and the assistant's ``answer``."""

    messages: list[dict[str, str]] = field(hash=False)
    answer: str

    @classmethod
    def from_prompt(cls, prompt: str, answer: str) -> TrainingRow:
        return cls([{"role": "user", "content": prompt}], answer)

    def as_json(self) -> dict[str, Any]:
        """The canonical stored form: a one-user-turn row as prompt/answer, anything else as messages."""
        if len(self.messages) == 1 and self.messages[0]["role"] == "user":
            return {"prompt": self.messages[0]["content"], "answer": self.answer}
        return {"messages": [*self.messages, {"role": "assistant", "content": self.answer}]}


@dataclass(frozen=True)
class TrainingDataInfo:
    expert: str  # slug
    sha256: str
    rows: int
    size: int

    def as_dict(self) -> dict[str, Any]:
        return {"expert": self.expert, "sha256": self.sha256, "rows": self.rows, "size": self.size}


# -- parsing -----------------------------------------------------------------------------------------


def _where(index: int, jsonl: bool) -> tuple[str, str]:
    """(human place, param prefix): JSONL lines count from 1, JSON list rows from 0."""
    return (f"line {index + 1}", f"{PARAM}.line[{index + 1}]") if jsonl else (f"row {index}", f"{PARAM}[{index}]")


def _bad(index: int, jsonl: bool, fld: str | None, reason: str) -> ValidationFailed:
    place, param = _where(index, jsonl)
    if fld:
        return ValidationFailed(f"{place}: `{fld}` {reason}", param=f"{param}.{fld}")
    return ValidationFailed(f"{place}: {reason}", param=param)


def _text(value: Any) -> bool:
    return isinstance(value, str) and bool(value.strip())


def parse_row(obj: Any, index: int = 0, *, jsonl: bool = False) -> TrainingRow:
    """One decoded row into a TrainingRow; ValidationFailed names the row and the field otherwise."""
    if not isinstance(obj, dict):
        raise _bad(index, jsonl, None, "a row must be an object with prompt/answer or messages")
    keys = set(obj)
    if keys == {"prompt", "answer"}:
        for fld in ("prompt", "answer"):
            if not _text(obj[fld]):
                raise _bad(index, jsonl, fld, "must be a non-empty string")
        return TrainingRow.from_prompt(obj["prompt"], obj["answer"])
    if keys == {"messages"}:
        messages = obj["messages"]
        if not isinstance(messages, list) or len(messages) < 2:
            raise _bad(index, jsonl, "messages", "must be a list of at least two messages (a prompt and the answer)")
        turns: list[dict[str, str]] = []
        for m, msg in enumerate(messages):
            fld = f"messages[{m}]"
            if not isinstance(msg, dict) or set(msg) != {"role", "content"}:
                raise _bad(index, jsonl, fld, "must be an object with exactly `role` and `content`")
            if msg["role"] not in ROLES:
                raise _bad(index, jsonl, f"{fld}.role", f"must be one of {', '.join(ROLES)}")
            if not _text(msg["content"]):
                raise _bad(index, jsonl, f"{fld}.content", "must be a non-empty string")
            turns.append({"role": msg["role"], "content": msg["content"]})
        if turns[-1]["role"] != "assistant":
            raise _bad(
                index, jsonl, f"messages[{len(turns) - 1}].role", "must be `assistant`: the last message is the answer"
            )
        if all(t["role"] != "user" for t in turns[:-1]):
            raise _bad(index, jsonl, "messages", "must hold a `user` message before the answer")
        return TrainingRow(turns[:-1], turns[-1]["content"])
    unknown = sorted(keys - {"prompt", "answer", "messages"})
    if unknown:
        raise _bad(index, jsonl, unknown[0], "is not a known field (use prompt + answer, or messages)")
    if "messages" in keys:
        raise _bad(index, jsonl, "messages", "cannot be combined with prompt/answer")
    raise _bad(index, jsonl, "answer" if "prompt" in keys else "prompt", "is required")


def parse_training_data(body: bytes) -> list[TrainingRow]:
    """Rows of a JSON list or JSONL body (sniffed: a body starting with ``[`` is a JSON list); all or
    nothing: the first bad row raises ValidationFailed naming its line / index and field."""
    if len(body) > MAX_TRAINING_DATA_BYTES:
        raise PayloadTooLarge(
            f"training data is larger than {MAX_TRAINING_DATA_BYTES // (1024 * 1024)} MiB", param=PARAM
        )
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValidationFailed(f"training data must be UTF-8 ({exc.reason} at byte {exc.start})", param=PARAM) from exc
    rows: list[TrainingRow] = []
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValidationFailed(f"invalid JSON at line {exc.lineno}: {exc.msg}", param=PARAM) from exc
        if len(items) > MAX_ROWS:
            raise ValidationFailed(f"at most {MAX_ROWS} rows", param=PARAM)
        rows = [parse_row(item, i) for i, item in enumerate(items)]
    else:
        for i, line in enumerate(text.splitlines()):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as exc:
                raise _bad(i, True, None, f"invalid JSON ({exc.msg})") from exc
            rows.append(parse_row(item, i, jsonl=True))
            if len(rows) > MAX_ROWS:
                raise ValidationFailed(f"at most {MAX_ROWS} rows", param=PARAM)
    if not rows:
        raise ValidationFailed("training data holds no rows", param=PARAM)
    return rows


def encode_rows(rows: list[TrainingRow]) -> bytes:
    """Canonical JSONL: one row per line, keys sorted, UTF-8 (equal data, equal bytes, equal sha256)."""
    return b"".join(json.dumps(r.as_json(), sort_keys=True, ensure_ascii=False).encode("utf-8") + b"\n" for r in rows)


def decode_rows(payload: bytes) -> list[TrainingRow]:
    return [parse_row(json.loads(line), i, jsonl=True) for i, line in enumerate(payload.splitlines()) if line.strip()]


# -- storage -----------------------------------------------------------------------------------------


class TrainingDataService:
    """Attach, describe and read back an expert's training examples (see the module docstring)."""

    def __init__(self, session: AsyncSession, store: ArtifactStore) -> None:
        self.session = session
        self.store = store

    async def _expert(self, ref: str) -> Expert:
        from registry.services import ExpertService

        return await ExpertService(self.session, self.store).get(ref)

    async def attach(self, ref: str, rows: list[TrainingRow]) -> TrainingDataInfo:
        """Store ``rows`` as ``ref``'s training data (replacing any). Idempotent for equal data. All or
        nothing: a failure removes the blob it created and leaves the old data in place."""
        expert = await self._expert(ref)
        if not rows:
            raise ValidationFailed("training data holds no rows", param=PARAM)
        payload = encode_rows(rows)
        old = await self.session.get(ExpertTrainingData, expert.id)
        staged = self.store.staging_dir()
        try:
            path = staged / "training.jsonl"
            with path.open("wb") as fh:
                fh.write(payload)
                fh.flush()
                os.fsync(fh.fileno())
            sha, size, created = self.store.put_file(path)
        finally:
            path.unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                staged.rmdir()
        if old is not None and old.sha256 == sha:
            return TrainingDataInfo(expert.slug, sha, old.rows, old.size)
        old_sha = old.sha256 if old is not None else None
        try:
            if old is None:
                self.session.add(ExpertTrainingData(expert_id=expert.id, sha256=sha, rows=len(rows), size=size))
            else:
                old.sha256, old.rows, old.size, old.created_at = sha, len(rows), size, utcnow()
            # A change of the expert: bumps the registry epoch, so memos built on the expert are re-read.
            expert.updated_at = utcnow()
            await self.session.commit()
        except BaseException as exc:
            await self.session.rollback()
            if created:
                self.store.discard_blobs([sha])
            if isinstance(exc, IntegrityError):  # another upload for this expert committed first
                raise Conflict(
                    f"training data of {expert.slug!r} was attached by another request at the same time: retry",
                    param=PARAM,
                ) from exc
            raise
        if old_sha is not None:
            await self._discard_if_unused(old_sha)
        return TrainingDataInfo(expert.slug, sha, len(rows), size)

    async def _discard_if_unused(self, sha: str) -> None:
        used = await self.session.scalar(select(ExpertTrainingData.expert_id).where(ExpertTrainingData.sha256 == sha))
        used = used or await self.session.scalar(select(ExpertFile.id).where(ExpertFile.sha256 == sha))
        if used is None:
            self.store.discard_blobs([sha])

    async def info(self, ref: str) -> TrainingDataInfo | None:
        expert = await self._expert(ref)
        return await self.info_of(expert.id, expert.slug)

    async def info_of(self, expert_id: uuid.UUID, slug: str) -> TrainingDataInfo | None:
        row = await self.session.get(ExpertTrainingData, expert_id)
        return None if row is None else TrainingDataInfo(slug, row.sha256, row.rows, row.size)

    async def rows(self, ref: str) -> list[TrainingRow]:
        """The stored rows; NotFound (param ``training_data``) when the expert has none."""
        info = await self.info(ref)
        if info is None:
            raise NotFound(f"expert {ref!r} has no training data", param=PARAM, code="no_training_data")
        return self.read(info.sha256)

    def read(self, sha: str) -> list[TrainingRow]:
        return decode_rows(self.store.blob_path(sha).read_bytes())


def referenced_blobs_query() -> Any:
    """The sha256 of every stored training data set (the store's garbage collection must keep them)."""
    return select(ExpertTrainingData.sha256).distinct()
