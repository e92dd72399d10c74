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
from serving.engine import MIXTURE_XARG, Choice, EngineUnavailable, GenChunk, GenerationFailed, GenRequest, GenResult
from serving.json_text import JsonText
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
    if s.n != 1:
        body["n"] = s.n
    if request.guidance is not None:
        body.update(request.guidance.fields())
    # a mixture slot's per-request vector, read per token by moerge's op (serving/mixture/slot.py: REQUEST_KEY)
    vector = request.mixture_weights if request.mixture_weights is not None else request.router_bias
    if vector is not None:
        body.update(mixture_fields(vector))
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    if request.messages is not None and request.prompt is None:
        body["messages"] = request.messages
        if s.logprobs is not None:
            body.update(logprobs=True, top_logprobs=s.logprobs)
        return "/v1/chat/completions", body, True
    if request.prompt is not None and request.messages is None:
        body["prompt"] = request.prompt
        if s.logprobs is not None:
            body["logprobs"] = s.logprobs
        if s.echo:
            body["echo"] = True
        return "/v1/completions", body, False
    raise ValidationFailed("give exactly one of messages (chat) or prompt (completion)", param="messages")


def _choice(raw: dict[str, Any], *, chat: bool, json_answer: bool = False) -> Choice:
    message = raw.get("message") or {}
    text = message.get("content") if chat else raw.get("text")
    if json_answer and text:
        text = JsonText().feed(text)
    return Choice(
        index=int(raw.get("index") or 0),
        text=text or "",
        finish_reason=raw.get("finish_reason") or "stop",
        tool_calls=tuple(message.get("tool_calls") or ()),
        logprobs=raw.get("logprobs") or None,
    )


def gen_result(
    data: dict[str, Any], *, chat: bool, model: str, latency_s: float, json_answer: bool = False
) -> GenResult:
    """A non-streamed reply (its first choice as ``text``, every choice in ``choices``); ``model`` is what the
    request asked for; ``json_answer``: the request asked for JSON (``JsonText``)."""
    choices = tuple(
        sorted((_choice(raw, chat=chat, json_answer=json_answer) for raw in data["choices"]), key=lambda c: c.index)
    )
    usage = data.get("usage") or {}
    return GenResult(
        text=choices[0].text,
        finish_reason=choices[0].finish_reason,
        prompt_tokens=int(usage.get("prompt_tokens") or 0),
        completion_tokens=int(usage.get("completion_tokens") or 0),
        latency_s=latency_s,
        extra={"id": data.get("id"), "model": model, "stop_reason": data["choices"][0].get("stop_reason")},
        choices=choices,
    )


class StreamParser:
    """Turns one stream's events into ``GenChunk``s: ``chunks`` per event (a piece of one of the n answers: text,
    tool-call deltas, log-probabilities), each answer's finish reason once it ends, then ``last`` (the token
    counts, which vLLM sends in its last event; the first answer's finish reason again when n is 1)."""

    def __init__(self, server: Server, *, chat: bool, json_answer: bool = False) -> None:
        self._server = server
        self._chat = chat
        self._json: dict[int, JsonText] | None = {} if json_answer else None  # per answer (``JsonText``)
        self._finish: dict[int, str] = {}
        self._usage: dict[str, Any] = {}

    def chunks(self, event: Any) -> list[GenChunk]:
        if "error" in event:
            base_id = self._server.base_id
            log.warning("vLLM for %s: error inside a stream: %s", base_id, error_message(event))
            raise GenerationFailed(f"the vLLM server for {base_id!r} failed mid-stream; {ADMIN_HINT}")
        out = []
        for choice in event.get("choices") or []:
            index = int(choice.get("index") or 0)
            delta = choice.get("delta") or {}
            piece = delta.get("content") if self._chat else choice.get("text")
            if piece and self._json is not None:
                piece = self._json.setdefault(index, JsonText()).feed(piece)
            calls = tuple(delta.get("tool_calls") or ())
            logprobs = choice.get("logprobs") or None
            finish = choice.get("finish_reason")
            if finish and index != 0:  # the first answer's end is told with the usage, in ``last``
                self._finish[index] = finish
            if piece or calls or logprobs or (finish and index != 0):
                out.append(
                    GenChunk(
                        text=piece or "",
                        index=index,
                        tool_calls=calls,
                        logprobs=logprobs,
                        finish_reason=finish if index != 0 else None,
                    )
                )
            if finish and index == 0:
                self._finish[0] = finish
        self._usage = event.get("usage") or self._usage
        return out

    def last(self) -> GenChunk:
        return GenChunk(
            text="",
            finish_reason=self._finish.get(0) or "stop",
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
