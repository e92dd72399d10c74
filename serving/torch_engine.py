"""The torch engine: transformers + PEFT in process, several LoRA adapters of one base in one batch.

One ``_Slot`` per base model holds the model, its tokenizer and (once an adapter is needed) the PeftModel
wrapping it, with every adapter attached once under its own name. Requests for a base queue on its slot; a
runner task takes up to ``max_batch_size`` of them at a time (whatever arrived while the previous batch ran)
and decodes them in ONE ``generate`` call in a worker thread, each row on its own adapter through PEFT's
mixed-adapter batch inference (``adapter_names=[...]``, ``"__base__"`` for none). Streams join the same
batches. ``generate_switching`` is the naive baseline (``set_adapter`` per adapter group) for benchmarks.

Per-row behaviour inside a shared ``generate`` call comes from two hooks transformers calls every step:

* ``_RowSampler`` (a logits processor): each row's own temperature, top-p and seeded generator; it samples
  the token itself and leaves only that token open, so the batch runs in greedy mode and greedy rows are
  untouched (token-exact with a plain ``generate``).
* ``_Tracker`` (a stopping criterion, called once per step with the step's tokens): each row's max_tokens,
  EOS and stop strings, stream text, and delivery of a row's result as soon as that row finishes.

OpenAI's options ride on the same hooks. ``n`` answers are n rows of the request (answer i seeded with the
request's seed + i, as vLLM does), delivered together once the last one ends (``_Answers``). Before anything
samples, ``torch_guidance.GrammarMask`` leaves a guided row (``response_format``, required or named tool calls)
only the tokens its xgrammar matcher allows, then ``_LogprobRecorder`` keeps the row's log-probabilities as vLLM
reports them by default (the log-softmax of the logits after the grammar's mask, before temperature); the tracker
advances the matcher and keeps the chosen token's. ``echo`` puts the prompt first, with its log-probabilities from
one forward pass over it. Tool calls are parsed out of the guided answer when it ends. A fused request refuses
guidance, log-probabilities and n > 1 (its tokens come from a mixture of distributions none of them describe).

Extension point for token-level mixtures and logit fusion (issue 7): every row carries a ``route`` (today
``"__base__"`` or a PEFT adapter name) and ``_Slot.batch_hooks`` turns a batch's routes into generate
kwargs, a context entered around ``generate`` and extra logits processors. A mixture layer wrapping the
base's linear modules installs its per-row routing in that context (as PEFT does for ``adapter_names``
with forward pre-hooks); logit fusion is a logits processor over rows that decode together.

Work nobody waits for stops. A caller that goes away (its task cancelled: a client hung up, a time limit;
a stream closed or cancelled in ``__anext__``) marks its job cancelled; the tracker ends that row at the
end of the current decoding step and delivers nothing. ``generate`` cannot take a row out of a running
batch, so a cancelled row that shares its batch stays in the tensors as padding, but it no longer holds
the batch open: the batch ends when its last live row ends, at once when all of its rows are cancelled.

Memory: what is loaded (each slot's parameters and buffers: base, adapters, mixture) is kept under
``max_loaded_gib``. After a slot loads something, the least recently used slots nobody is using are
unloaded until the total fits; a slot in use (a request on it not yet answered, a stream not yet closed,
a batch, load or trace running) is never unloaded, and one slot larger than the bound still loads (with a
warning). An unloaded slot loads again on its next request.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import itertools
import logging
import threading
import time
from collections.abc import AsyncGenerator, Callable, Collection, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    PreTrainedModel,
    StoppingCriteria,
    StoppingCriteriaList,
)

from core.errors import MoergeError, Unprocessable, ValidationFailed
from core.settings import Settings
from serving import logit_fusion, torch_guidance
from serving.engine import (
    GREEDY_BELOW,
    Capabilities,
    Choice,
    EngineUnavailable,
    GenChunk,
    GenerationFailed,
    GenRequest,
    GenResult,
    Target,
    TokenMixture,
    TokenTrace,
)
from serving.json_text import JsonText
from serving.mixture import AdapterRefused, apply_mixture, load_lora_adapter
from serving.mixture.route import WEIGHTED

log = logging.getLogger(__name__)
LOG_HINT = "an admin can read why in moerge's log"  # errors name the model, never its files: those are logged

# transformers builds a model on the meta device inside a process-wide torch device context: two loads in
# two threads at once (two slots, or two engines) break each other ("Cannot copy out of meta tensor").
_LOADING = threading.Lock()

BASE_ROUTE = "__base__"  # PEFT's name for "no adapter" in a mixed batch
MIXTURE_ROUTE = "__mixture__"  # every row of a mixture slot: the routed adapters act per token
DEFAULT_MAX_LOADED_GIB: float = Settings.torch_max_loaded_gib  # the field's default, written once there
GIB = 1 << 30

Outcome = GenResult | BaseException


# --- jobs: one request waiting for, or inside, a batch -------------------------------------------------


@dataclass(eq=False)
class _Job:
    """A request plus where its answer goes: a future (generate) or a chunk queue (stream).

    Results are handed over with ``call_soon_threadsafe`` because batches run in worker threads."""

    request: GenRequest
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Outcome] | None = None
    chunks: asyncio.Queue[GenChunk | BaseException] | None = None
    submitted: float = field(default_factory=time.perf_counter)
    cancelled: bool = False  # the caller went away: drop the row at the next step

    @property
    def streaming(self) -> bool:
        return self.chunks is not None

    def _call(self, fn: Callable[..., Any], *args: Any) -> None:
        with contextlib.suppress(RuntimeError):  # the caller's loop is closed: nobody is listening
            self.loop.call_soon_threadsafe(fn, *args)

    def deliver(self, outcome: Outcome | GenChunk) -> None:
        if self.future is not None:
            self._call(_resolve, self.future, outcome)
        elif self.chunks is not None:
            self._call(self.chunks.put_nowait, outcome)


def _resolve(future: asyncio.Future[Outcome], outcome: Outcome) -> None:
    # Exceptions travel as results: the Engine protocol returns them in the list instead of raising.
    if not future.done():
        future.set_result(outcome)


def _failure(exc: BaseException, what: str, where: Path | None = None) -> MoergeError:
    """``exc`` as the caller sees it: a moerge error as it is; anything else by its type only, because its text
    can name files (a model folder, a cache): the whole of it, and ``where``, go to moerge's log."""
    if isinstance(exc, MoergeError):
        return exc
    if not isinstance(exc, asyncio.CancelledError):  # a shutdown, not a failure worth a traceback
        log.warning("torch engine: %s%s", what, f" ({where})" if where is not None else "", exc_info=exc)
    return GenerationFailed(f"{what} ({type(exc).__name__}); {LOG_HINT}")


# --- per base model -------------------------------------------------------------------------------------


@dataclass
class BatchHooks:
    """How a batch's row routes act on the model during one ``generate`` call."""

    generate_kwargs: dict[str, Any] = field(default_factory=dict)
    context: AbstractContextManager[Any] = field(default_factory=contextlib.nullcontext)
    processors: list[LogitsProcessor] = field(default_factory=list)


@dataclass(eq=False)
class _Slot:
    base_id: str
    base_dir: Path
    # One user of the model at a time: a batch, a switching run, a load or close. A threading lock because
    # the work runs in worker threads; waiting on it never blocks the event loop.
    lock: threading.Lock = field(default_factory=threading.Lock)
    model: PreTrainedModel | None = None
    peft: Any = None  # peft.PeftModel once the first adapter is attached
    tokenizer: Any = None
    pad_id: int = 0
    eos_ids: frozenset[int] = frozenset()
    max_positions: int | None = None
    adapters: dict[str, tuple[str, Path]] = field(default_factory=dict)  # adapter_id -> (PEFT name, folder)
    queue: list[_Job] = field(default_factory=list)
    runner: asyncio.Task[None] | None = None
    loaded_at: float | None = None
    mixture: TokenMixture | None = None  # a token-level composition: its own copy of the base, adapters mixed in
    mixture_layers: dict[str, Any] = field(default_factory=dict)  # module path -> MixtureLinear
    grammars: torch_guidance.Grammars | None = None  # xgrammar's view of the tokenizer, built on first use
    bytes: int = 0  # parameters and buffers of what is loaded (base, adapters, mixture); 0 when unloaded
    last_used: int = 0  # the engine's tick when a use last began or ended here: least recently used goes first
    users: int = 0  # requests on it not yet answered, streams not yet closed: such a slot stays loaded

    @property
    def in_use(self) -> bool:
        return self.users > 0 or bool(self.queue) or self.lock.locked()

    @property
    def generator_model(self) -> Any:
        return self.peft if self.peft is not None else self.model

    def batch_hooks(self, routes: list[str]) -> BatchHooks:
        """PEFT mixed-adapter batch: one adapter name per row. A token-level mixture adds its routes here."""
        if self.peft is None:
            return BatchHooks()  # nothing attached yet: every row is the plain base
        return BatchHooks(generate_kwargs={"adapter_names": list(routes)})


def _peft_name(adapter_id: str) -> str:
    # PEFT names become nn.ModuleDict keys, which may not contain "." (nor shadow the base route).
    if adapter_id and "." not in adapter_id and adapter_id != BASE_ROUTE:
        return adapter_id
    return "adapter_" + hashlib.sha1(adapter_id.encode()).hexdigest()[:16]


def _module_bytes(module: torch.nn.Module) -> int:
    """Parameters and buffers, each tensor once (tied weights are one parameter)."""
    tensors = {id(t): t for t in itertools.chain(module.parameters(), module.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _has_lora_layers(model: torch.nn.Module) -> bool:
    from peft.tuners.lora import LoraLayer

    return any(isinstance(m, LoraLayer) for m in model.modules())


# --- rows: one request inside one generate call ---------------------------------------------------------


# One token's log-probability: (token id, log-probability or None (an echoed prompt's first token), the likeliest
# alternatives as (token id, log-probability), best first, or None)
_TokenLogprob = tuple[int, float | None, list[tuple[int, float]] | None]
LOGPROB_FLOOR = -9999.0  # what a token the grammar ruled out (-inf) is reported as, as vLLM does (JSON has no -inf)


@dataclass(eq=False)
class _Row:
    job: _Job
    route: str
    prompt_ids: list[int]
    max_new: int
    out_ids: list[int] = field(default_factory=list)
    reason: str | None = None  # "stop", "length", or "cancelled"; set once, when the row finishes
    sent: int = 0  # characters already streamed
    fusion: logit_fusion.FusionGroup | None = None  # logit fusion: the group of rows decoding one answer
    extra: dict[str, Any] = field(default_factory=dict)  # merged into the result's extra
    index: int = 0  # which of the request's n answers this row writes
    seed: int | None = None  # its generator's seed (the request's seed + index, as vLLM derives them)
    answers: _Answers | None = None  # the request's rows, whose answers are delivered together
    constraint: torch_guidance.Constraint | None = None  # the JSON the answer must be (None: free text)
    matcher: Any = None  # xgrammar's GrammarMatcher for ``constraint``
    json_text: JsonText | None = None  # escapes raw control characters in a JSON answer's strings (``_json_safe``)
    logprobs: list[_TokenLogprob] = field(default_factory=list)  # one per generated token, when asked
    pending: tuple[torch.Tensor, list[tuple[int, float]]] | None = None  # this step's log-probabilities
    lp_sent: int = 0  # log-probability entries already streamed
    offset: int = 0  # a text completion's text_offset after the tokens already reported

    @property
    def sampling(self) -> Any:
        return self.job.request.sampling

    @property
    def stops(self) -> tuple[str, ...]:
        return tuple(s for s in self.sampling.stop if s)

    @property
    def calls_tools(self) -> bool:
        return self.constraint is not None and self.constraint.tools is not None


@dataclass(eq=False)
class _Answers:
    """The rows of one request (``Sampling.n`` of them, one each): their answers go out together, as one
    ``GenResult`` with every ``Choice``, or as a stream whose last chunk (answer 0's) comes after every answer."""

    rows: list[_Row]
    choices: dict[int, Choice] = field(default_factory=dict)
    completion_tokens: int = 0
    prompt_logprobs: list[_TokenLogprob] | None = None  # an echoed prompt's tokens (the first without one)

    @property
    def job(self) -> _Job:
        return self.rows[0].job  # (a fused request's leader is given its caller's job after preparing)

    @property
    def done(self) -> bool:
        return len(self.choices) == len(self.rows)


def _token_text(tokenizer: Any, token: int) -> str:
    """One token's text decoded alone (vLLM's), with the leading spaces a SentencePiece decode drops put back."""
    text = str(tokenizer.decode([token]))
    raw = tokenizer.convert_ids_to_tokens(token)
    if isinstance(raw, str):
        marks = len(raw) - len(raw.lstrip(torch_guidance.METASPACE))
        missing = marks - (len(text) - len(text.lstrip(" ")))
        if missing > 0:
            text = " " * missing + text
    return text


def _openai_logprobs(
    tokenizer: Any, entries: list[_TokenLogprob], *, chat: bool, offset: int = 0
) -> tuple[dict[str, Any], int]:
    """(entries in OpenAI's shape, the text offset after them): a chat's ``{"content": [...]}`` (the top
    alternatives as a list), a text completion's ``{"tokens", "token_logprobs", "top_logprobs", "text_offset"}``
    (each position's alternatives and the chosen token as one dict)."""
    names: dict[int, str] = {}

    def name(token: int) -> str:
        if token not in names:
            names[token] = _token_text(tokenizer, token)
        return names[token]

    def floor(value: float) -> float:
        return max(value, LOGPROB_FLOOR)

    if chat:
        content = []
        for token, logprob, top in entries:
            text = name(token)
            content.append(
                {
                    "token": text,
                    "logprob": floor(logprob if logprob is not None else LOGPROB_FLOOR),
                    "bytes": list(text.encode("utf-8", errors="replace")),
                    "top_logprobs": [
                        {
                            "token": name(t),
                            "logprob": floor(v),
                            "bytes": list(name(t).encode("utf-8", errors="replace")),
                        }
                        for t, v in (top or [])
                    ],
                }
            )
        return {"content": content}, offset
    tokens: list[str] = []
    values: list[float | None] = []
    tops: list[dict[str, float] | None] = []
    offsets: list[int] = []
    for token, logprob, top in entries:
        text = name(token)
        tokens.append(text)
        values.append(None if logprob is None else floor(logprob))
        if top is None or logprob is None:
            tops.append(None)
        else:
            alternatives = {name(t): floor(v) for t, v in top}
            alternatives.setdefault(text, floor(logprob))  # the chosen token always, as OpenAI's
            tops.append(alternatives)
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}, offset


def _cut_at_stop(text: str, stops: tuple[str, ...]) -> tuple[str, bool]:
    """Cut at the earliest occurrence of any stop string (the stop string itself is not returned)."""
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


class _RowSampler(LogitsProcessor):
    """Per-row temperature, top-p and seed inside one batch (transformers' own processors apply one
    setting to every row, and its sampling uses the global RNG, so a seed would depend on the batch).

    A sampled row's token is drawn here with the row's own generator and all other logits are masked, so
    the greedy argmax transformers then takes returns exactly that token."""

    def __init__(self, rows: list[_Row]) -> None:
        self.rows = rows
        self.generators: dict[int, torch.Generator] = {}
        for i, row in enumerate(rows):
            if row.sampling.temperature >= GREEDY_BELOW and row.sampling.top_p >= GREEDY_BELOW:
                gen = torch.Generator()
                if row.seed is None:
                    gen.seed()
                else:  # any integer: torch takes 64 bits (a larger seed failed the whole batch)
                    gen.manual_seed(row.seed & 0xFFFF_FFFF_FFFF_FFFF)
                self.generators[i] = gen

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        for i, gen in self.generators.items():
            row = self.rows[i]
            if row.reason is not None:
                continue
            probs = torch.softmax(scores[i].float() / row.sampling.temperature, dim=-1)
            if row.sampling.top_p < 1.0:
                sorted_probs, order = torch.sort(probs, descending=True)
                # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
                drop = (sorted_probs.cumsum(-1) - sorted_probs) >= row.sampling.top_p
                drop[0] = False  # even when float32 rounds the first token's mass to zero
                sorted_probs[drop] = 0.0
                probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
            token = int(torch.multinomial(probs, 1, generator=gen).item())
            masked = torch.full_like(scores[i], float("-inf"))
            masked[token] = 0.0
            scores[i] = masked
        return scores


class _LogprobRecorder(LogitsProcessor):
    """Each asking row's log-probabilities at this step: vLLM's default (``raw_logprobs``), the log-softmax of the
    model's logits before temperature, top-p or min_tokens, after the grammar's mask (vLLM masks before its
    sampler too), with the row's likeliest tokens. The tracker keeps the chosen token's once it is chosen."""

    def __init__(self, rows: list[_Row]) -> None:
        self.rows = rows

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        asking = [i for i, r in enumerate(self.rows) if r.reason is None and r.sampling.logprobs is not None]
        if not asking:
            return scores
        logprobs = torch.log_softmax(scores[asking].float(), dim=-1)
        k = min(max(self.rows[i].sampling.logprobs for i in asking), logprobs.shape[-1])
        values, ids = logprobs.topk(k, dim=-1) if k else (logprobs[:, :0], logprobs[:, :0].long())
        for j, i in enumerate(asking):
            n = self.rows[i].sampling.logprobs
            top = list(zip(ids[j, :n].tolist(), values[j, :n].tolist(), strict=True))
            self.rows[i].pending = (logprobs[j], top)
        return scores


class _EosBlocker(LogitsProcessor):
    """vLLM's ``min_tokens`` and ``ignore_eos`` per row: end-of-sequence cannot be chosen while they hold (except
    on a guided row: its grammar alone says when the JSON is whole, and then nothing but the end is open)."""

    def __init__(self, rows: list[_Row], eos_ids: frozenset[int]) -> None:
        self.rows = rows
        self.eos_ids = sorted(eos_ids)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        for i, row in enumerate(self.rows):
            if row.matcher is not None:
                continue
            if row.reason is None and (row.sampling.ignore_eos or len(row.out_ids) < row.sampling.min_tokens):
                scores[i, self.eos_ids] = float("-inf")
        return scores


class _Tracker(StoppingCriteria):
    """Transformers calls this once per decoding step, right after choosing the step's tokens: the hook for
    each row's own limits (max_tokens, EOS, stop strings), its stream text and early delivery of its result
    (a short answer does not wait for the longest row of its batch)."""

    def __init__(self, rows: list[_Row], tokenizer: Any, eos_ids: frozenset[int]) -> None:
        self.rows = rows
        self.batch_size = len(rows)
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        newest = input_ids[:, -1].tolist()
        done = torch.zeros(len(self.rows), dtype=torch.bool, device=input_ids.device)
        for i, row in enumerate(self.rows):
            if row.reason is None:
                self._step(row, int(newest[i]))
            done[i] = row.reason is not None
        return done  # type: ignore[return-value]

    def _decode(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=True))

    def _step(self, row: _Row, token: int) -> None:
        if row.job.cancelled:
            row.reason = "cancelled"
            return
        row.out_ids.append(token)
        if row.pending is not None:
            logprobs, top = row.pending
            row.logprobs.append((token, float(logprobs[token]), top))
            row.pending = None
        if row.matcher is not None:
            torch_guidance.advance(row.matcher, token)
        stops = row.stops
        if token in self.eos_ids:
            row.reason = "stop"
        elif row.job.streaming:
            text, hit = _cut_at_stop(self._decode(row.out_ids), stops)
            if hit:
                row.reason = "stop"
            elif not row.calls_tools:  # tool calls go out whole, parsed, when the answer ends
                # Hold back what may be the start of a stop string, and half-decoded UTF-8 characters.
                hold = max((len(s) for s in stops), default=1) - 1
                visible = text.rstrip("\ufffd")
                self._emit(row, visible[: max(0, len(visible) - hold)])
        elif stops:
            # Only the tail can hold a stop string that was not there a step earlier; a longer window than
            # the stop needs, because a decoder may drop a leading space of the first token it sees.
            window = max(len(s) for s in stops) + 8
            if _cut_at_stop(self._decode(row.out_ids[-window:]), stops)[1]:
                row.reason = "stop"
        if row.reason is None and len(row.out_ids) >= row.max_new:
            row.reason = "length"
        if row.reason is not None:
            self.finish(row)

    def _emit(self, row: _Row, text: str) -> None:
        if len(text) > row.sent:
            piece = _json_safe(row, text[row.sent :])
            row.job.deliver(GenChunk(text=piece, index=row.index, logprobs=self._unsent_logprobs(row)))
            row.sent = len(text)

    def _unsent_logprobs(self, row: _Row) -> dict[str, Any] | None:
        """The log-probabilities of the row's tokens not yet streamed (None when none were asked)."""
        if row.sampling.logprobs is None:
            return None
        entries, row.lp_sent = row.logprobs[row.lp_sent :], len(row.logprobs)
        shaped, row.offset = _openai_logprobs(self.tokenizer, entries, chat=_is_chat(row), offset=row.offset)
        return shaped

    def finish(self, row: _Row) -> None:
        ids = row.out_ids[:-1] if row.out_ids and row.out_ids[-1] in self.eos_ids else row.out_ids
        text, hit = _cut_at_stop(self._decode(ids), row.stops)
        reason = "stop" if hit else (row.reason or "length")
        row.reason = reason
        calls: tuple[dict[str, Any], ...] = ()
        if row.constraint is not None and row.calls_tools:  # the answer is the calls: no text (vLLM's "")
            calls = torch_guidance.tool_calls(row.constraint, text)
            reason, text = torch_guidance.finish_reason(row.constraint, reason), ""
        answers = row.answers if row.answers is not None else _Answers([row])
        answers.completion_tokens += len(row.out_ids)
        request = row.job.request
        if row.job.streaming:
            answers.choices[row.index] = Choice(row.index, "", reason)
            rest = _json_safe(row, text[row.sent :]) if len(text) > row.sent else ""
            row.sent = max(row.sent, len(text))
            deltas = tuple({"index": k, **call} for k, call in enumerate(calls))
            piece = GenChunk(text=rest, index=row.index, tool_calls=deltas, logprobs=self._unsent_logprobs(row))
            last = GenChunk(
                text="",
                finish_reason=answers.choices[0].finish_reason if 0 in answers.choices else reason,
                prompt_tokens=len(row.prompt_ids),
                completion_tokens=answers.completion_tokens,
            )
            if row.index == 0 and answers.done:  # the usual case (n = 1): one last chunk with the rest
                piece.finish_reason, piece.prompt_tokens, piece.completion_tokens = (
                    reason,
                    last.prompt_tokens,
                    last.completion_tokens,
                )
                row.job.deliver(piece)
                return
            if row.index != 0:
                piece.finish_reason = reason  # another answer's end; the stream ends with answer 0's
            if piece.finish_reason or piece.text or piece.tool_calls or piece.logprobs:
                row.job.deliver(piece)
            if answers.done:
                row.job.deliver(last)
            return
        logprobs = None
        if row.sampling.logprobs is not None:
            entries = [*(answers.prompt_logprobs or []), *row.logprobs] if _echoes(row) else row.logprobs
            logprobs = _openai_logprobs(self.tokenizer, entries, chat=_is_chat(row))[0]
        text = _json_safe(row, text)
        if _echoes(row):
            text = (request.prompt or "") + text
        answers.choices[row.index] = Choice(row.index, text, reason, calls, logprobs)
        if not answers.done:
            return
        choices = tuple(answers.choices[i] for i in range(len(answers.rows)))
        first = choices[0]
        plain = len(choices) == 1 and not first.tool_calls and first.logprobs is None
        row.job.deliver(
            GenResult(
                text=first.text,
                finish_reason=first.finish_reason,
                prompt_tokens=len(row.prompt_ids),
                completion_tokens=answers.completion_tokens,
                latency_s=time.perf_counter() - row.job.submitted,
                extra={
                    "engine": "torch",
                    "adapter": request.target.adapter_id,
                    "batch_size": self.batch_size,
                    **answers.rows[0].extra,
                },
                choices=() if plain else choices,
            )
        )


def _is_chat(row: _Row) -> bool:
    return row.job.request.messages is not None


def _echoes(row: _Row) -> bool:
    """A text completion asked to repeat its prompt before the answer."""
    return bool(row.sampling.echo) and row.job.request.prompt is not None


# --- the engine -----------------------------------------------------------------------------------------


class TorchEngine:
    """In-process transformers + PEFT engine (see the module docstring).

    ``max_batch_size``: rows per ``generate`` call; more waiting requests run in the next batch.
    ``dtype``: float32 by default, the fastest on this CPU (bf16 measured 3-5 times slower).
    ``max_loaded_gib``: the bound on what stays loaded (``MOERGE_TORCH_MAX_LOADED_GIB``; see the module
    docstring); ``inf`` for none."""

    name = "torch"
    capabilities = Capabilities(
        token_mixtures=True, logit_fusion=True, traces=True, guidance=True, logprobs=True, choices=True
    )

    def __init__(
        self,
        *,
        max_batch_size: int = 16,
        dtype: torch.dtype = torch.float32,
        device: str = "cpu",
        max_loaded_gib: float = DEFAULT_MAX_LOADED_GIB,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be at least 1")
        if not max_loaded_gib >= 0:  # also refuses NaN
            raise ValueError(f"max_loaded_gib (MOERGE_TORCH_MAX_LOADED_GIB) must be >= 0, got {max_loaded_gib}")
        self.max_batch_size = max_batch_size
        self.dtype = dtype
        self.device = torch.device(device)
        self.max_loaded_bytes = max_loaded_gib * GIB  # a float: inf means no bound
        self._slots: dict[tuple[str, str, str], _Slot] = {}
        self._ticks = itertools.count(1)  # the LRU clock; next() on it is atomic under the GIL
        self._fitting = threading.Lock()  # one unloading pass at a time

    # -- public API ------------------------------------------------------------------------------------

    async def generate(self, requests: list[GenRequest]) -> list[GenResult | BaseException]:
        """All requests, batched per base with mixed adapters; failures are returned in place."""
        loop = asyncio.get_running_loop()
        jobs = [_Job(request=r, loop=loop, future=loop.create_future()) for r in requests]
        slots: list[_Slot] = []
        try:
            for job in jobs:
                slots.append(self._submit(job))
            return list(await asyncio.gather(*(j.future for j in jobs if j.future is not None)))
        finally:
            for job in jobs:
                job.cancelled = True  # no-op once answered; frees the rows if our caller was cancelled
            for slot in slots:
                self._release(slot)

    async def generate_switching(self, requests: list[GenRequest]) -> list[GenResult | BaseException]:
        """Naive baseline for benchmarks: per base, one adapter group after another, activating each with
        PEFT's ``set_adapter`` (the base with ``disable_adapter``), instead of one mixed batch."""
        loop = asyncio.get_running_loop()
        jobs = [_Job(request=r, loop=loop, future=loop.create_future()) for r in requests]
        by_slot: dict[int, tuple[_Slot, list[_Job]]] = {}
        for job in jobs:
            slot = self._slot(job.request.target)
            by_slot.setdefault(id(slot), (slot, []))[1].append(job)
        for slot, _ in by_slot.values():
            self._acquire(slot)
        try:
            for slot, slot_jobs in by_slot.values():
                await asyncio.to_thread(self._run_jobs, slot, slot_jobs, switching=True)
            return list(await asyncio.gather(*(j.future for j in jobs if j.future is not None)))
        finally:
            for job in jobs:
                job.cancelled = True  # a cancelled caller: the thread's rows end at the next step
            for slot, _ in by_slot.values():
                self._release(slot)

    async def stream(self, request: GenRequest) -> AsyncGenerator[GenChunk, None]:
        """Stream one completion; it shares batches with ``generate``. The last chunk carries the finish
        reason and token counts. A failure before any text (bad adapter, base not loadable) raises from the
        first ``__anext__``. With ``n`` answers, pieces carry their answer's ``index``, each other answer's last
        piece its finish reason, and the last chunk (answer 0's finish reason, the usage) comes after all."""
        loop = asyncio.get_running_loop()
        chunks: asyncio.Queue[GenChunk | BaseException] = asyncio.Queue()
        job = _Job(request=request, loop=loop, chunks=chunks)
        slot = self._submit(job)
        try:
            while True:
                item = await chunks.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finish_reason is not None and item.index == 0:
                    return
        finally:
            job.cancelled = True  # a client that went away (close, or cancelled here) stops its row at the next step
            self._release(slot)

    async def load(self, target: Target) -> None:
        """Load the base (and adapter) now rather than on the first request, e.g. before a benchmark."""
        slot = self._slot(target)
        self._acquire(slot)
        try:
            await asyncio.to_thread(self._load_locked, slot, target)
        finally:
            self._release(slot)

    async def trace(self, request: GenRequest, completion: str = "") -> TokenTrace:
        """The per-token, per-layer adapter choices of a token-level mixture on the request's prompt followed
        by ``completion`` (e.g. its answer), from one forward pass (routing is causal: each token's choice
        depends on its prefix only, so this is what generation chose, up to float ties)."""
        if request.target.mixture is None:
            raise ValidationFailed("a trace needs a composition with a token-level router", param="model")
        slot = self._slot(request.target)
        self._acquire(slot)
        try:
            return await asyncio.to_thread(self._trace, slot, request, completion)
        finally:
            self._release(slot)

    async def status(self) -> list[dict[str, Any]]:
        return [
            {
                "engine": self.name,
                "name": slot.mixture.composition if slot.mixture is not None else slot.base_id,
                "base_dir": str(slot.base_dir),
                "state": "loaded" if slot.model is not None else "not_loaded",
                "device": str(self.device),
                "dtype": str(self.dtype).removeprefix("torch."),
                "adapters": slot.mixture.slugs if slot.mixture is not None else sorted(slot.adapters),
                **({"router": slot.mixture.router} if slot.mixture is not None else {}),
                "queued": len(slot.queue),
                "in_use": slot.in_use,
                "bytes": slot.bytes,
                "loaded_at": slot.loaded_at,
            }
            for slot in self._slots.values()
        ]

    async def forget(self, adapter_id: str, names: Collection[str]) -> None:
        """Nothing to do: an adapter's id never names other weights (a re-registered slug gets a new id), and a
        slot nobody uses is unloaded when room is needed (``max_loaded_gib``)."""

    async def close(self) -> None:
        """Drop every model (waiting for a running batch to end); queued requests fail as unavailable."""
        slots, self._slots = list(self._slots.values()), {}
        for slot in slots:
            queued, slot.queue = slot.queue, []
            for job in queued:
                job.deliver(EngineUnavailable("the torch engine was closed", retry_after=1))
            await asyncio.to_thread(self._drop_locked, slot)
        gc.collect()

    # -- scheduling --------------------------------------------------------------------------------------

    def _slot(self, target: Target) -> _Slot:
        mixture = target.mixture
        key = (target.base_id, str(Path(target.base_dir)), mixture.key if mixture is not None else "")
        slot = self._slots.get(key)
        if slot is None:
            slot = self._slots[key] = _Slot(base_id=target.base_id, base_dir=Path(target.base_dir), mixture=mixture)
        return slot

    def _submit(self, job: _Job) -> _Slot:
        """Queue ``job`` on its slot, which counts it as a user until the caller calls ``_release``."""
        slot = self._slot(job.request.target)
        self._acquire(slot)
        slot.queue.append(job)
        runner = slot.runner
        if runner is None or runner.done() or runner.get_loop() is not job.loop:
            slot.runner = job.loop.create_task(self._drain(slot))
        return slot

    def _acquire(self, slot: _Slot) -> None:
        slot.users += 1
        slot.last_used = next(self._ticks)

    def _release(self, slot: _Slot) -> None:
        slot.users -= 1
        slot.last_used = next(self._ticks)

    async def _drain(self, slot: _Slot) -> None:
        # Whatever queued while a batch ran goes into the next batch: concurrent callers share batches.
        while slot.queue:
            jobs = [j for j in slot.queue[: self.max_batch_size] if not j.cancelled]
            del slot.queue[: self.max_batch_size]
            if not jobs:
                continue
            try:
                await asyncio.to_thread(self._run_jobs, slot, jobs)
            except BaseException as exc:  # _run_jobs reports per-row failures itself; this is a bug or shutdown
                for job in jobs:
                    job.deliver(_failure(exc, "batch failed"))
                if isinstance(exc, asyncio.CancelledError):
                    raise

    # -- worker-thread side ------------------------------------------------------------------------------

    def _run_jobs(self, slot: _Slot, jobs: list[_Job], *, switching: bool = False) -> None:
        with slot.lock, torch.inference_mode():
            try:
                self._ensure_base(slot)
            except Exception as exc:
                for job in jobs:
                    job.deliver(_failure(exc, f"cannot load base model {slot.base_id!r}", slot.base_dir))
                return
            rows: list[_Row] = []
            for job in jobs:
                if job.cancelled:
                    continue
                try:
                    if job.request.fusion is not None:  # one row per member: serving/logit_fusion.py
                        _refuse_fused(job.request)
                        follower = lambda r, j=job: self._prepare(slot, _Job(request=r, loop=j.loop))[0]  # noqa: E731
                        rows += logit_fusion.fused_rows(job.request, follower, job, switching=switching)
                    else:
                        rows += self._prepare(slot, job)
                except Exception as exc:
                    job.deliver(_failure(exc, "request failed"))
            self._fit(slot)  # what this batch loaded may push others out; this slot is locked, so it stays
            if not switching:
                for batch in logit_fusion.batches(rows, self.max_batch_size):  # a fused group stays in one batch
                    self._decode(slot, batch)
                return
            groups: dict[str, list[_Row]] = {}
            for row in rows:
                groups.setdefault(row.route, []).append(row)
            for route, group in groups.items():
                with self._only_adapter(slot, route):
                    for start in range(0, len(group), self.max_batch_size):
                        self._decode(slot, group[start : start + self.max_batch_size], mixed=False)

    @contextlib.contextmanager
    def _only_adapter(self, slot: _Slot, route: str) -> Iterator[None]:
        if slot.peft is None:
            yield
        elif route == BASE_ROUTE:
            with slot.peft.disable_adapter():
                yield
        else:
            slot.peft.set_adapter(route, inference_mode=True)
            yield

    def _load_locked(self, slot: _Slot, target: Target) -> None:
        with slot.lock:
            self._ensure_base(slot)
            self._ensure_adapter(slot, target)
            self._fit(slot)

    def _fit(self, keep: _Slot) -> None:
        """Unload the least recently used slots nobody uses until what is loaded fits the bound.

        Called with ``keep``'s lock held (the slot just loaded, about to serve). Another slot is unloaded
        only while this thread holds its lock too (taken without waiting: a slot whose lock is taken has a
        batch, load or trace running), so no work is ever running on a slot being unloaded; a request that
        arrives for it just after finds it unloaded and loads it again."""
        with self._fitting:
            loaded = [s for s in list(self._slots.values()) if s.model is not None]
            total = sum(s.bytes for s in loaded)
            unloaded: list[_Slot] = []
            for slot in sorted(loaded, key=lambda s: s.last_used):
                if total <= self.max_loaded_bytes:
                    break
                if slot is keep or slot.users or slot.queue or not slot.lock.acquire(blocking=False):
                    continue
                try:
                    if slot.users or slot.queue or slot.model is None:  # claimed while we took the lock
                        continue
                    total -= slot.bytes
                    self._drop(slot)
                    unloaded.append(slot)
                finally:
                    slot.lock.release()
        if unloaded:
            gc.collect()  # a model's modules reference each other: free them now, not at some later collection
            log.info(
                "torch engine: unloaded %s (least recently used) to stay under %.2f GiB; %.2f GiB loaded",
                ", ".join(_slot_name(s) for s in unloaded),
                self.max_loaded_bytes / GIB,
                total / GIB,
            )

    def _drop_locked(self, slot: _Slot) -> None:
        with slot.lock:
            self._drop(slot)

    def _drop(self, slot: _Slot) -> None:
        slot.mixture_layers = {}
        slot.grammars = None
        slot.model = slot.peft = slot.tokenizer = None
        slot.adapters.clear()
        slot.loaded_at = None
        slot.bytes = 0

    def _measure(self, slot: _Slot) -> None:
        """Record what ``slot`` holds now (after loading its base or an adapter)."""
        slot.bytes = _module_bytes(slot.generator_model)
        if slot.bytes > self.max_loaded_bytes:
            log.warning(
                "torch engine: %s takes %.2f GiB, more than MOERGE_TORCH_MAX_LOADED_GIB (%.2f): loaded anyway; "
                "everything else not in use is unloaded",
                _slot_name(slot),
                slot.bytes / GIB,
                self.max_loaded_bytes / GIB,
            )

    def _ensure_base(self, slot: _Slot) -> None:
        if slot.model is not None:
            return
        with _LOADING:
            tokenizer = AutoTokenizer.from_pretrained(slot.base_dir)
            model: PreTrainedModel = AutoModelForCausalLM.from_pretrained(slot.base_dir, dtype=self.dtype)
        if self.device.type != "cpu":
            model.to(self.device)  # type: ignore[arg-type]  # transformers' stub types .to() for dtypes only
        model.eval()
        gen_eos = model.generation_config.eos_token_id
        eos = set(gen_eos if isinstance(gen_eos, list) else [gen_eos] if gen_eos is not None else [])
        if tokenizer.eos_token_id is not None:
            eos.add(tokenizer.eos_token_id)
        pad = tokenizer.pad_token_id
        if pad is None:
            pad = model.generation_config.pad_token_id
        if pad is None:
            pad = min(eos) if eos else 0  # any id works: padded positions are masked out
        if slot.mixture is not None:
            slot.mixture_layers = _mix(model, slot.mixture)
        slot.tokenizer, slot.model, slot.peft, slot.grammars = tokenizer, model, None, None
        slot.eos_ids, slot.pad_id = frozenset(eos), int(pad)
        slot.max_positions = getattr(model.config, "max_position_embeddings", None)
        slot.adapters.clear()
        slot.loaded_at = time.time()
        self._measure(slot)

    def _ensure_adapter(self, slot: _Slot, target: Target) -> str:
        """The row's route: the base, or the PEFT name of the target's adapter (attached on first use)."""
        if slot.mixture is not None:
            return MIXTURE_ROUTE
        if target.adapter_id is None and target.adapter_dir is None:
            return BASE_ROUTE
        if target.adapter_id is None or target.adapter_dir is None:
            raise ValidationFailed("an adapter target needs both adapter_id and adapter_dir", param="model")
        adapter_dir = Path(target.adapter_dir)
        known = slot.adapters.get(target.adapter_id)
        if known is not None and known[1] == adapter_dir:
            return known[0]
        name = _peft_name(target.adapter_id)
        if known is not None:  # same id, new folder (re-registered): replace it
            slot.peft.delete_adapter(name)
            del slot.adapters[target.adapter_id]
        try:
            self._attach(slot, name, adapter_dir)
        except Unprocessable as exc:  # the adapter is of a kind this engine cannot run: say which, and why
            raise Unprocessable(f"adapter {target.adapter_id!r}: {exc.message}", param="model") from exc
        except Exception as exc:
            failure = _failure(exc, f"cannot load adapter {target.adapter_id!r}", adapter_dir)
            failure.param = "model"
            raise failure from exc
        slot.adapters[target.adapter_id] = (name, adapter_dir)
        self._measure(slot)
        return name

    def _attach(self, slot: _Slot, name: str, adapter_dir: Path) -> None:
        from peft import PeftConfig, PeftModel, PeftType

        config = PeftConfig.from_pretrained(str(adapter_dir))
        # Mixed-adapter batches exist for LoRA only, and PEFT refuses DoRA in them: refuse up front, per request.
        if config.peft_type != PeftType.LORA:
            raise Unprocessable(f"only LoRA adapters are supported, this one is {config.peft_type}", param="model")
        if getattr(config, "use_dora", False):
            raise Unprocessable("DoRA adapters cannot run in mixed-adapter batches", param="model")
        if slot.peft is not None:
            try:
                slot.peft.load_adapter(str(adapter_dir), adapter_name=name, is_trainable=False)
            except Exception:
                if name in slot.peft.peft_config:  # injected before its weights failed: take it out again
                    slot.peft.delete_adapter(name)
                raise
        else:
            assert slot.model is not None  # _ensure_base ran first
            try:
                slot.peft = PeftModel.from_pretrained(slot.model, str(adapter_dir), adapter_name=name)
            except Exception:
                # PEFT injects LoRA layers into the base in place before loading weights: if that happened,
                # the base is no longer clean, so reload it from disk.
                if slot.model is not None and _has_lora_layers(slot.model):
                    self._drop(slot)
                    self._ensure_base(slot)
                raise
        slot.peft.eval()

    def _prepare(self, slot: _Slot, job: _Job) -> list[_Row]:
        """The request's rows: one per answer (``n``), each with its seed and, for guided JSON, its matcher."""
        request, sampling = job.request, job.request.sampling
        if sampling.max_tokens < 1:
            raise ValidationFailed("max_tokens must be at least 1", param="max_tokens")
        if sampling.temperature < 0:
            raise ValidationFailed("temperature must not be negative", param="temperature")
        if not 0 < sampling.top_p <= 1:
            raise ValidationFailed("top_p must be in (0, 1]", param="top_p")
        if sampling.n < 1:
            raise ValidationFailed("n must be at least 1", param="n")
        if sampling.logprobs is not None and sampling.logprobs < 0:
            raise ValidationFailed("logprobs must not be negative", param="logprobs")
        if sampling.echo and request.prompt is None:
            raise ValidationFailed("echo repeats a text completion's prompt; a chat has none", param="echo")
        constraint = torch_guidance.constraint(request.guidance)
        route = self._ensure_adapter(slot, request.target)
        ids = self._encode(slot, request)
        _check_context(slot, request, len(ids), room=1)
        max_new = sampling.max_tokens
        if slot.max_positions:
            max_new = min(max_new, slot.max_positions - len(ids))  # the context is full: finish with "length"
        grammars = self._grammars(slot) if constraint is not None else None
        rows = [
            _Row(
                job=job,
                route=route,
                prompt_ids=ids,
                max_new=max_new,
                index=i,
                seed=None if sampling.seed is None else sampling.seed + i,
                constraint=constraint,
                matcher=grammars.matcher(constraint) if grammars is not None and constraint is not None else None,
            )
            for i in range(sampling.n)
        ]
        answers = _Answers(rows)
        for row in rows:
            row.answers = answers
        return rows

    def _grammars(self, slot: _Slot) -> torch_guidance.Grammars:
        if slot.grammars is None:
            assert slot.model is not None
            vocab = slot.model.get_output_embeddings().weight.shape[0]  # the width of the logits
            slot.grammars = torch_guidance.Grammars(slot.tokenizer, int(vocab), sorted(slot.eos_ids))
        return slot.grammars

    def _encode(self, slot: _Slot, request: GenRequest) -> list[int]:
        tokenizer = slot.tokenizer
        if request.messages is not None:
            template = request.target.chat_template  # the registry's, in place of the model's own
            if not (template or tokenizer.chat_template):
                raise ValidationFailed(f"base model {slot.base_id!r} has no chat template", param="messages")
            tools = list(request.guidance.tools) if request.guidance is not None and request.guidance.tools else None
            try:
                text = tokenizer.apply_chat_template(
                    request.messages, tools=tools, chat_template=template, tokenize=False, add_generation_prompt=True
                )
            except (jinja2.TemplateError, TypeError, ValueError) as exc:  # the caller's messages, not the engine
                raise ValidationFailed(
                    f"the chat template of {slot.base_id!r} cannot render these messages: {str(exc)[:200]}",
                    param="messages",
                ) from None
            # The template already spells out the special tokens.
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            param = "messages"
        elif request.prompt is not None:
            ids = tokenizer(request.prompt)["input_ids"]  # the tokenizer's own specials, as vLLM does
            param = "prompt"
        else:
            raise ValidationFailed("a request needs messages or a prompt", param="messages")
        if not ids:
            raise ValidationFailed("the prompt is empty", param=param)
        return list(ids)

    def _prompt_logprobs(self, slot: _Slot, row: _Row) -> list[_TokenLogprob]:
        """An echoed prompt's tokens with their log-probabilities (the first has none), from one forward pass over
        the prompt on the row's own adapter or mixture."""
        n = row.sampling.logprobs
        ids = torch.tensor([row.prompt_ids], dtype=torch.long, device=self.device)
        hooks = slot.batch_hooks([row.route])
        with hooks.context, _row_bias(slot, [row]):
            logits = slot.generator_model(input_ids=ids, **hooks.generate_kwargs).logits[0, :-1]
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        k = min(n, logprobs.shape[-1])
        values, top = logprobs.topk(k, dim=-1)
        entries: list[_TokenLogprob] = [(row.prompt_ids[0], None, None)]
        for j, token in enumerate(row.prompt_ids[1:]):
            alternatives = list(zip(top[j].tolist(), values[j].tolist(), strict=True))
            entries.append((token, float(logprobs[j, token]), alternatives))
        return entries

    def _echo(self, slot: _Slot, rows: list[_Row]) -> None:
        """Before decoding: each echoing answer's prompt log-probabilities (once per request); a stream's answers
        begin with the prompt (and those)."""
        for row in rows:
            if not _echoes(row) or row.answers is None:
                continue
            if row.sampling.logprobs is not None and row.answers.prompt_logprobs is None:
                row.answers.prompt_logprobs = self._prompt_logprobs(slot, row)
            if row.job.streaming:
                logprobs = None
                if row.sampling.logprobs is not None:
                    entries = row.answers.prompt_logprobs or []
                    logprobs, row.offset = _openai_logprobs(slot.tokenizer, entries, chat=False)
                row.job.deliver(GenChunk(text=row.job.request.prompt or "", index=row.index, logprobs=logprobs))

    def _decode(self, slot: _Slot, rows: list[_Row], *, mixed: bool = True) -> None:
        """One ``generate`` call over ``rows`` (left-padded); every row's result is delivered by the tracker."""
        rows = [r for r in rows if not r.job.cancelled]
        if not rows:
            return
        width = max(len(r.prompt_ids) for r in rows)
        input_ids = torch.full((len(rows), width), slot.pad_id, dtype=torch.long)
        attention = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            n = len(row.prompt_ids)
            input_ids[i, width - n :] = torch.tensor(row.prompt_ids, dtype=torch.long)
            attention[i, width - n :] = 1
        hooks = slot.batch_hooks([r.route for r in rows]) if mixed else BatchHooks()
        fusion_processors, fusion_stoppers = logit_fusion.hooks(rows, slot.eos_ids)
        processors = LogitsProcessorList()
        if any(r.matcher is not None for r in rows):  # first: what the grammar rules out is never anything's
            processors.append(torch_guidance.GrammarMask(rows, self._grammars(slot).vocab_size))
        if any(r.sampling.logprobs is not None for r in rows):
            processors.append(_LogprobRecorder(rows))
        processors.extend([*hooks.processors, *fusion_processors])
        if slot.eos_ids and any(r.sampling.ignore_eos or r.sampling.min_tokens for r in rows):
            processors.append(_EosBlocker(rows, slot.eos_ids))  # before sampling, so EOS is never drawn
        if any(r.sampling.temperature > 0 for r in rows):
            processors.append(_RowSampler(rows))
        tracker = _Tracker(rows, slot.tokenizer, slot.eos_ids)
        config = GenerationConfig(
            max_new_tokens=max(r.max_new for r in rows),
            do_sample=False,  # sampled rows are drawn by _RowSampler; see its docstring
            eos_token_id=sorted(slot.eos_ids) or None,
            pad_token_id=slot.pad_id,
        )
        try:
            self._echo(slot, rows)
            with hooks.context, _row_bias(slot, rows):
                slot.generator_model.generate(
                    input_ids=input_ids.to(self.device),
                    attention_mask=attention.to(self.device),
                    generation_config=config,
                    logits_processor=processors,
                    stopping_criteria=StoppingCriteriaList([tracker, *fusion_stoppers]),
                    **hooks.generate_kwargs,
                )
        except Exception as exc:
            failure = _failure(exc, "generation failed")
            for row in rows:
                if row.reason is None:
                    row.reason = "failed"
                    row.job.deliver(failure)
            return
        for row in rows:  # generate ended without the tracker finishing a row (should not happen): close it
            if row.reason is None:
                row.reason = "length"
                tracker.finish(row)

    def _trace(self, slot: _Slot, request: GenRequest, completion: str) -> TokenTrace:
        with slot.lock, torch.inference_mode():
            self._ensure_base(slot)
            self._fit(slot)
            assert slot.mixture is not None and slot.model is not None
            prompt_ids = self._encode(slot, request)
            extra = slot.tokenizer(completion, add_special_tokens=False)["input_ids"] if completion else []
            _check_context(slot, request, len(prompt_ids) + len(extra), room=0)  # one forward pass over them all
            ids = torch.tensor([prompt_ids + list(extra)], dtype=torch.long, device=self.device)
            layers = slot.mixture_layers
            for layer in layers.values():
                layer.record = True
            try:
                with _row_bias(slot, [request]):
                    slot.model(input_ids=ids)
                routes = {name: layer.last_route for name, layer in layers.items()}
            finally:
                for layer in layers.values():
                    layer.record, layer.last_route = False, None
        return _trace_of(slot.mixture, slot.tokenizer, ids[0].tolist(), len(prompt_ids), routes)


def _refuse_fused(request: GenRequest) -> None:
    """What a fused request cannot ask for: its members decode one answer from a mixture of their distributions,
    which neither a grammar nor the log-probabilities (each member's own) follow, and one group is one answer."""
    guidance, sampling = request.guidance, request.sampling
    asked = [
        (guidance is not None and guidance.calls_tools, "tools", "tool calls"),
        (guidance is not None and guidance.response_format is not None, "response_format", "JSON answers"),
        (sampling.logprobs is not None, "logprobs", "log-probabilities"),
        (sampling.n > 1, "n", "several answers (n > 1)"),
    ]
    for wanted, param, what in asked:
        if wanted:
            raise ValidationFailed(
                f"logit fusion (experts decoding one answer together) cannot give {what}", param=param
            )


def _json_safe(row: _Row, text: str) -> str:
    """A JSON answer's text (a guided row's, not tool calls) with raw control characters in its strings escaped
    (``serving/json_text.py``: xgrammar lets a string take them); the row keeps the state between stream pieces."""
    if row.constraint is None or row.calls_tools:
        return text
    if row.json_text is None:
        row.json_text = JsonText()
    return row.json_text.feed(text)


def _slot_name(slot: _Slot) -> str:
    return f"mixture {slot.mixture.composition!r}" if slot.mixture is not None else f"base {slot.base_id!r}"


# --- token-level mixtures --------------------------------------------------------------------------------


def _mix(model: PreTrainedModel, mixture: TokenMixture) -> dict[str, Any]:
    """Wrap ``model``'s adapted linear layers with the mixture (in place); refusals name the adapter."""
    router = mixture.make_router()
    try:
        adapters = [load_lora_adapter(folder, slug) for _, slug, folder in mixture.adapters]
        states = [{k: torch.as_tensor(v) for k, v in state.items()} for state in mixture.states] or None
        return apply_mixture(model, adapters, router, states)
    except AdapterRefused as exc:
        raise ValidationFailed(str(exc), param="experts") from exc


@contextlib.contextmanager
def _row_bias(slot: _Slot, rows: list[Any]) -> Iterator[None]:
    """Set each sequence's router bias (GLIDER) on the mixture layers for one forward or generate call."""
    requests = [r.job.request if isinstance(r, _Row) else r for r in rows]
    vectors = [req.mixture_weights if req.mixture_weights is not None else req.router_bias for req in requests]
    if slot.mixture is None or all(v is None for v in vectors):
        yield
        return
    n = len(slot.mixture.adapters)
    # a weighted mixture's router reads its weights here (NaN: the request brought none); a token router its bias
    bias = torch.full((len(requests), n), float("nan") if slot.mixture.router == WEIGHTED else 0.0)
    for i, vector in enumerate(vectors):
        if vector is not None:
            if len(vector) != n:
                raise ValidationFailed(f"the request's mixture vector has {len(vector)} values for {n} adapters")
            bias[i] = torch.tensor(vector, dtype=torch.float32)
    for layer in slot.mixture_layers.values():
        layer.row_bias = bias
    try:
        yield
    finally:
        for layer in slot.mixture_layers.values():
            layer.row_bias = None


def _layer_of(module: str) -> str:
    """``model.layers.3.self_attn.q_proj`` -> ``3`` (the decoder layer); other modules keep their path."""
    parts = module.split(".")
    for i, part in enumerate(parts[:-1]):
        if part == "layers" and parts[i + 1].isdigit():
            return parts[i + 1]
    return module


def _check_context(slot: _Slot, request: GenRequest, tokens: int, *, room: int) -> None:
    """Refuse ``tokens`` that do not fit the model's context with ``room`` positions left to generate."""
    if slot.max_positions and tokens + room > slot.max_positions:
        param = "messages" if request.messages is not None else "prompt"
        raise ValidationFailed(
            f"the prompt has {tokens} tokens; this model takes at most {slot.max_positions - room}", param=param
        )


def _trace_of(
    mixture: TokenMixture, tokenizer: Any, ids: list[int], prompt_tokens: int, routes: dict[str, Any]
) -> TokenTrace:
    experts = len(mixture.adapters)
    by_layer: dict[str, list[torch.Tensor]] = {}
    top_k = 0
    for module, route in routes.items():
        if route is None:
            continue
        dense = torch.zeros(len(ids), experts)
        dense.scatter_add_(1, route.experts.reshape(len(ids), -1), route.weights.reshape(len(ids), -1).float())
        top_k = max(top_k, route.experts.shape[-1])
        by_layer.setdefault(_layer_of(module), []).append(dense)
    order = sorted(by_layer, key=lambda name: (0, int(name)) if name.isdigit() else (1, name))
    weights = [torch.stack(by_layer[name]).mean(0) for name in order]
    return TokenTrace(
        tokens=[str(tokenizer.decode([i])) for i in ids],
        prompt_tokens=prompt_tokens,
        experts=mixture.slugs,
        layers=order,
        weights=[[[round(float(w), 4) for w in row] for row in layer.tolist()] for layer in weights],
        top_k=top_k,
    )
