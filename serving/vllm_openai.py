"""vLLM's OpenAI API as moerge uses it: the body of a completion or chat request, its reply as a ``GenResult``,
its stream's events as ``GenChunk``s, and vLLM's error answers as moerge errors a caller may read."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from collections.abc import Sequence
from typing import Any

from core.errors import ValidationFailed
from serving.engine import MIXTURE_XARG, EngineUnavailable, GenChunk, GenerationFailed, GenRequest, GenResult
from serving.vllm_client import Reply
from serving.vllm_server import ADMIN_HINT, Server

log = logging.getLogger(__name__)


def refuse_torch_only(request: GenRequest) -> None:
    """vLLM runs one adapter per request: a token-level mixture or a fused request would silently be answered
    by one model alone (the app's EngineSet sends them to its torch engine instead)."""
    if request.target.mixture is not None or request.fusion is not None:
        what = "a token-level mixture" if request.target.mixture is not None else "a logit-fusion request"
        raise ValidationFailed(f"the vLLM engine cannot run {what}; use the torch engine", param="model")


def mixture_fields(vector: Sequence[float]) -> dict[str, Any]:
    """The body fields that bring a mixture slot its request's vector (GLIDER's bias, a weighted mixture's weights):
    ``vllm_xargs``, read per token by moerge's op, and a ``cache_salt``: vLLM caches a prompt's KV blocks per
    adapter, but a mixture's KV depends on the vector too, so requests share cached blocks only under one vector."""
    values = [float(v) for v in vector]
    salt = "moerge-mix-" + hashlib.sha256(json.dumps(values).encode()).hexdigest()[:32]
    return {"vllm_xargs": {MIXTURE_XARG: values}, "cache_salt": salt}


def payload(request: GenRequest, *, stream: bool) -> tuple[str, dict[str, Any], bool]:
    """(path, body without model, is_chat) for vLLM's OpenAI API."""
    s = request.sampling
    body: dict[str, Any] = {"max_tokens": s.max_tokens, "temperature": s.temperature, "top_p": s.top_p}
    if s.stop:
        body["stop"] = list(s.stop)
    if s.seed is not None:
        body["seed"] = s.seed
    if s.min_tokens:
        body["min_tokens"] = s.min_tokens
    if s.ignore_eos:
        body["ignore_eos"] = True
    # a mixture slot's per-request vector, read per token by moerge's op (serving/mixture/slot.py: REQUEST_KEY)
    vector = request.mixture_weights if request.mixture_weights is not None else request.router_bias
    if vector is not None:
        body.update(mixture_fields(vector))
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    if request.messages is not None and request.prompt is None:
        body["messages"] = request.messages
        return "/v1/chat/completions", body, True
    if request.prompt is not None and request.messages is None:
        body["prompt"] = request.prompt
        return "/v1/completions", body, False
    raise ValidationFailed("give exactly one of messages (chat) or prompt (completion)", param="messages")


def gen_result(data: dict[str, Any], *, chat: bool, model: str, latency_s: float) -> GenResult:
    """A non-streamed reply's first choice; ``model`` is what the request asked for."""
    choice = data["choices"][0]
    text = (choice.get("message") or {}).get("content") if chat else choice.get("text")
    usage = data.get("usage") or {}
    return GenResult(
        text=text or "",
        finish_reason=choice.get("finish_reason") or "stop",
        prompt_tokens=int(usage.get("prompt_tokens") or 0),
        completion_tokens=int(usage.get("completion_tokens") or 0),
        latency_s=latency_s,
        extra={"id": data.get("id"), "model": model, "stop_reason": choice.get("stop_reason")},
    )


class StreamParser:
    """Turns one stream's events into ``GenChunk``s: ``chunks`` per event, then ``last`` (finish reason and
    token counts, which vLLM sends in its last events)."""

    def __init__(self, server: Server, *, chat: bool) -> None:
        self._server = server
        self._chat = chat
        self._finish: str | None = None
        self._usage: dict[str, Any] = {}

    def chunks(self, event: Any) -> list[GenChunk]:
        if "error" in event:
            base_id = self._server.base_id
            log.warning("vLLM for %s: error inside a stream: %s", base_id, error_message(event))
            raise GenerationFailed(f"the vLLM server for {base_id!r} failed mid-stream; {ADMIN_HINT}")
        out = []
        for choice in event.get("choices") or []:
            piece = (choice.get("delta") or {}).get("content") if self._chat else choice.get("text")
            if piece:
                out.append(GenChunk(text=piece))
            self._finish = choice.get("finish_reason") or self._finish
        self._usage = event.get("usage") or self._usage
        return out

    def last(self) -> GenChunk:
        return GenChunk(
            text="",
            finish_reason=self._finish or "stop",
            prompt_tokens=int(self._usage.get("prompt_tokens") or 0),
            completion_tokens=int(self._usage.get("completion_tokens") or 0),
        )


def error_message(reply_or_body: Reply | dict[str, Any]) -> str:
    """The message of vLLM's OpenAI-shaped error ({"error": {"message": ...}}), or the raw text."""
    body: Any
    if isinstance(reply_or_body, Reply):
        try:
            body = reply_or_body.json()
        except ValueError:
            return reply_or_body.text[:500] or f"HTTP {reply_or_body.status_code}"
    else:
        body = reply_or_body
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])
        if isinstance(err, str):
            return err
    return str(body)[:500]


def raise_for_status(reply: Reply, server: Server) -> None:
    """Nothing for a success; else the moerge error a caller gets for vLLM's answer."""
    if reply.status_code < 400:
        return
    message = error_message(reply)
    param = None
    with contextlib.suppress(ValueError, AttributeError):
        param = (reply.json().get("error") or {}).get("param")
    if reply.status_code in (400, 422):  # vLLM validated the request: the caller's input is wrong, say why
        raise ValidationFailed(message, param=param)
    # Anything else is vLLM's own trouble, whose text can name files: logged, not passed on.
    log.warning("vLLM for %s answered %d: %s", server.base_id, reply.status_code, message)
    if reply.status_code == 503:
        raise EngineUnavailable(f"the vLLM server for {server.base_id!r} is unavailable; {ADMIN_HINT}", retry_after=5)
    raise GenerationFailed(
        f"the vLLM server for {server.base_id!r} answered {reply.status_code}; {ADMIN_HINT}",
        param=param,
    )
