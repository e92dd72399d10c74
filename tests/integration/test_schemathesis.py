"""schemathesis over every operation of the app's OpenAPI schema (/api/schema/openapi.json), with valid keys:
no request gets a 5xx.

The app runs as it is served (uvicorn, a SQLite file, the torch engine with a tiny random Llama and a LoRA of
it registered). Handlers that read a body decode it themselves (``decode_strict``), so the schema Litestar
serves has no request bodies: the test adds each one from the very msgspec struct its handler decodes into
(``BODIES``), steering a few fields toward real names (the registered models, a message's role) so that
generated requests reach past the first lookup. Every operation runs with data that fits the schema
(positive) and data that does not (negative), with the admin key (every operation; GETs also with the query
key), a fixed seed and a bounded number of examples; the routes that generate run once more with lean bodies
(``LEAN``) so that requests reach the model. Excluded: nothing. The two SSE routes
(``/api/merges|jobs/{id}/events``) end at once for an unknown job, no route stops the server, and queued jobs
(merges, trainings, fits a generated request may submit) stay queued: the app runs without its worker.
"""

from __future__ import annotations

import collections
import copy
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest

schemathesis = pytest.importorskip("schemathesis")  # a test dependency (pyproject's dev extra, the lock)

from hypothesis import HealthCheck, Phase, given, seed, settings  # noqa: E402
from hypothesis.errors import Unsatisfiable  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.core.failures import FailureGroup  # noqa: E402
from schemathesis.generation import GenerationMode  # noqa: E402

from api.compositions.controllers import RouteRequest  # noqa: E402
from api.keys.schemas import KeyCreate  # noqa: E402
from api.openai.protocol import ChatCompletionRequest, CompletionRequest  # noqa: E402
from api.openai.responses.protocol import ResponsesRequest  # noqa: E402
from composition.service import CompositionPatch, CompositionSpec  # noqa: E402
from core.settings import Settings  # noqa: E402
from jobs.train import TrainRequest  # noqa: E402
from merging.config import MergeRequest  # noqa: E402
from registry import db  # noqa: E402
from registry.schemas import EvalIn, ExpertPatch, ExpertSpec, ImportRequest  # noqa: E402
from serving.torch_engine import TorchEngine  # noqa: E402
from tests.fixtures.db import make_keys  # noqa: E402
from tests.fixtures.live import register, serve  # noqa: E402
from tests.fixtures.tiny import build_tiny_lora  # noqa: E402

# Examples per operation and key. CI runs these, derandomized (the same requests every run); a deeper search
# locally: MOERGE_SCHEMATHESIS_SCALE=10 MOERGE_SCHEMATHESIS_SEED=7 (ten times as many, another seed each time).
SCALE = float(os.environ.get("MOERGE_SCHEMATHESIS_SCALE", "1"))
SEED = os.environ.get("MOERGE_SCHEMATHESIS_SEED")
EXAMPLES = {GenerationMode.POSITIVE: round(25 * SCALE), GenerationMode.NEGATIVE: round(15 * SCALE)}
LEAN_EXAMPLES = round(30 * SCALE)
MODELS = ["tiny-base", "tiny-lora", "auto", "nosuch"]  # registered, a composition, unknown

# The struct each handler decodes its JSON body into (as in the controllers).
BODIES: dict[tuple[str, str], type[msgspec.Struct]] = {
    ("post", "/api/experts/import"): ImportRequest,
    ("patch", "/api/experts/{ref}"): ExpertPatch,
    ("post", "/api/experts/{ref}/evals"): EvalIn,
    ("post", "/api/compositions"): CompositionSpec,
    ("patch", "/api/compositions/{name}"): CompositionPatch,
    ("post", "/api/route"): RouteRequest,
    ("post", "/api/keys"): KeyCreate,
    ("post", "/v1/chat/completions"): ChatCompletionRequest,
    ("post", "/v1/completions"): CompletionRequest,
    ("post", "/v1/responses"): ResponsesRequest,
    ("post", "/api/merges"): MergeRequest,
    ("post", "/api/jobs/train"): TrainRequest,
}
# What the engine runs: for the routes that generate, a second pass with bodies of only these fields, the
# names registered and the messages well-formed (a full body nearly always sets something these routes refuse,
# `tools` or `n` say, so a request would seldom reach the model).
LEAN: dict[tuple[str, str], tuple[str, ...]] = {
    ("post", "/v1/chat/completions"): (
        "model",
        "messages",
        "max_tokens",
        "temperature",
        "top_p",
        "stop",
        "seed",
        "stream",
        "min_tokens",
        "ignore_eos",
        "moerge_trace",
    ),
    ("post", "/v1/completions"): (
        "model",
        "prompt",
        "max_tokens",
        "temperature",
        "top_p",
        "stop",
        "seed",
        "stream",
        "min_tokens",
        "ignore_eos",
        "echo",
        "moerge_trace",
    ),
    ("post", "/v1/responses"): ("model", "input", "instructions", "max_output_tokens", "temperature", "stream"),
    ("post", "/api/route"): ("model", "query", "trace"),
}
LEAN_MAX_TOKENS = 16
MESSAGE = {
    "type": "object",
    "properties": {"role": {"enum": ["system", "user", "assistant"]}, "content": {"type": "string"}},
    "required": ["role", "content"],
    "additionalProperties": False,
}


def _names(names: list[str]) -> dict[str, Any]:
    """One of ``names`` or any other string. (Without the `not`, the generator folds the names into "a string"
    and never picks them.)"""
    return {"anyOf": [{"enum": names}, {"type": "string", "not": {"enum": names}}]}


# The multipart upload (form fields of an ExpertSpec, then the folder's files) and the training rows.
UPLOAD = {
    "type": "object",
    "properties": {
        "slug": {"type": "string"},
        "base": _names(MODELS[:2]),
        "kind": {"type": "string"},
        "skills": {"type": "string"},
        "files": {"type": "array", "items": {"type": "string", "format": "binary"}},
        "archive": {"type": "string", "format": "binary"},
    },
}
TRAINING_ROWS = {
    "type": "array",
    "items": {"type": "object", "properties": {"prompt": {"type": "string"}, "answer": {"type": "string"}}},
}


def _with_bodies(spec: dict[str, Any], *, lean: bool = False) -> dict[str, Any]:
    """The served schema with each JSON body the handlers read, and the upload's and training rows' bodies;
    ``lean``: the generating routes' bodies cut to ``LEAN``."""
    structs = list(dict.fromkeys(BODIES.values()))
    refs, components = msgspec.json.schema_components(structs, ref_template="#/components/schemas/Body{name}")
    lean_fields = {BODIES[key].__name__: fields for key, fields in LEAN.items()} if lean else {}
    for name, schema in components.items():
        props = schema.get("properties", {})
        if name in lean_fields:
            schema["properties"] = props = {k: v for k, v in props.items() if k in lean_fields[name]}
            props["model"] = {"enum": MODELS}
            if "messages" in props:
                props["messages"] = {"type": "array", "items": MESSAGE, "minItems": 1}
            if "max_tokens" in props:  # short answers: this pass is about reaching the model, not long outputs
                props["max_tokens"] = {"type": "integer", "minimum": 1, "maximum": LEAN_MAX_TOKENS}
                props["min_tokens"] = {"type": "integer", "minimum": 0, "maximum": LEAN_MAX_TOKENS}
            if "max_output_tokens" in props:
                props["max_output_tokens"] = {"type": "integer", "minimum": 1, "maximum": LEAN_MAX_TOKENS}
            for text in ("prompt", "query", "input"):
                if text in props:
                    props[text] = {"type": "string", "minLength": 1}
            required = ("model", "messages", "prompt", "query", "input", "max_tokens", "max_output_tokens")
            schema["required"] = [f for f in required if f in props]
            continue
        for field in ("model", "base", "base_model", "fallback"):  # a real name now and then
            if props.get(field, {}).get("type") == "string":
                props[field] = _names(MODELS)
        if props.get("messages", {}).get("type") == "array":
            props["messages"] = {"type": "array", "items": {"anyOf": [MESSAGE, {"type": "object", "not": MESSAGE}]}}
    spec.setdefault("components", {}).setdefault("schemas", {}).update(
        {f"Body{name}": schema for name, schema in components.items()}
    )
    by_struct = dict(zip(structs, refs, strict=True))
    for (method, path), struct in BODIES.items():
        operation = spec["paths"][path][method]
        operation["requestBody"] = {"required": True, "content": {"application/json": {"schema": by_struct[struct]}}}
    spec["paths"]["/api/experts"]["post"]["requestBody"] = {
        "required": True,
        "content": {"multipart/form-data": {"schema": UPLOAD}},
    }
    spec["paths"]["/api/experts/{ref}/training-data"]["post"]["requestBody"] = {
        "required": True,
        "content": {"application/json": {"schema": TRAINING_ROWS}},
    }
    for operations in spec["paths"].values():  # path parameters: a registered name now and then
        for method, operation in operations.items():
            for param in operation.get("parameters", []):
                if param.get("in") == "path" and param["name"] in ("ref", "name") and method != "delete":
                    param["schema"] = _names(MODELS)
    return spec


@dataclass
class Live:
    url: str
    admin: dict[str, str]
    query: dict[str, str]


@pytest.fixture(scope="module")
def live(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    root = tmp_path_factory.mktemp("schemathesis")
    home, imports = root / "home", root / "imports"
    imports.mkdir()
    url = f"sqlite+aiosqlite:///{home / 'moerge.db'}"
    db.upgrade(url)
    admin, query = make_keys(url)
    app_settings = Settings(home=home, database_url=url, import_roots=(imports.resolve(),))
    register(app_settings, tiny_base, ExpertSpec(slug="tiny-base"))
    register(
        app_settings, build_tiny_lora(tiny_base, root / "tiny-lora"), ExpertSpec(slug="tiny-lora", base="tiny-base")
    )
    with serve(app_settings, TorchEngine(), worker=False) as base_url:
        made = httpx.post(
            f"{base_url}/api/compositions",
            headers={"Authorization": f"Bearer {admin}"},
            json={"name": "auto", "router": "direct", "experts": ["tiny-lora"]},
        )
        assert made.status_code == 201, made.text
        yield Live(base_url, {"Authorization": f"Bearer {admin}"}, {"Authorization": f"Bearer {query}"})


def _fuzz(
    operation: Any,
    mode: GenerationMode,
    examples: int,
    url: str,
    headers: dict[str, str],
    statuses: collections.Counter[int],
    failures: dict[str, str],
) -> None:
    """Send ``examples`` generated requests to one operation; note each status and its first 5xx."""

    @settings(
        max_examples=examples,
        derandomize=SEED is None,  # a fixed seed: the same requests every run
        database=None,
        deadline=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @seed(int(SEED or 0))
    @given(case=operation.as_strategy(generation_mode=mode))
    def run(case: Any) -> None:
        response = case.call(base_url=url, headers=headers, timeout=60)
        statuses[response.status_code] += 1
        try:
            case.validate_response(response, checks=[not_a_server_error], headers=headers)
        except (AssertionError, FailureGroup):  # keep going: every operation's first 5xx is reported, not only one
            failures.setdefault(operation.label, f"{response.status_code}: {case.as_curl_command(headers)}")

    try:
        run()
    except Unsatisfiable:  # negative data for an operation with no input (GET /api/health): nothing to break
        assert mode is GenerationMode.NEGATIVE, operation.label


def test_no_operation_answers_a_server_error(live: Live) -> None:
    spec = httpx.get(f"{live.url}/api/schema/openapi.json").json()
    schema = schemathesis.openapi.from_dict(_with_bodies(copy.deepcopy(spec)))
    lean = schemathesis.openapi.from_dict(_with_bodies(copy.deepcopy(spec), lean=True))
    statuses: collections.Counter[int] = collections.Counter()
    failures: dict[str, str] = {}  # operation -> the first request that got a 5xx, as curl
    operations = [result.ok() for result in schema.get_all_operations()]
    for operation in operations:
        keys = [live.admin, live.query] if operation.method.upper() == "GET" else [live.admin]
        for headers in keys:
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                _fuzz(operation, mode, EXAMPLES[mode], live.url, headers, statuses, failures)
    for result in lean.get_all_operations():
        operation = result.ok()
        if (operation.method.lower(), operation.path) in LEAN:
            _fuzz(operation, GenerationMode.POSITIVE, LEAN_EXAMPLES, live.url, live.query, statuses, failures)

    total = sum(statuses.values())
    print(
        f"\n{len(operations)} operations, {total} requests: "
        + ", ".join(f"{s} x{n}" for s, n in sorted(statuses.items()))
    )
    assert not failures, "\n".join(f"{label}: {curl}" for label, curl in failures.items())
    assert len(operations) == sum(len(ops) for ops in spec["paths"].values())  # every operation ran


@pytest.mark.parametrize("path", ["/api/keys", "/api/jobs", "/api/merges", "/api/experts"])
def test_a_page_offset_past_64_bits_is_a_400(live: Live, path: str) -> None:
    """Found by the run above: ``/api/keys?offset=30526071413387010048`` reached SQLite and failed there with
    an OverflowError (500). A page's offset and limit are bounded where the query parameters are read."""
    for params, field in (({"offset": 2**64}, "offset"), ({"limit": 0}, "limit"), ({"limit": 501}, "limit")):
        resp = httpx.get(f"{live.url}{path}", params=params, headers=live.admin)
        assert resp.status_code == 400, resp.text
        assert resp.json()["error"]["param"] == field, resp.text
    assert httpx.get(f"{live.url}{path}", params={"offset": 2**53 - 1}, headers=live.admin).status_code == 200


def test_sampling_at_the_edges_of_its_ranges(live: Live) -> None:
    """Found by the runs above, each a 502 from the torch engine: temperature 9.68e-138 (its softmax went NaN),
    top_p 2.3e-181 (every token dropped) and seed 2^64 (past what torch's generators take). A temperature or
    top_p below 1e-5 now decodes greedily (as vLLM does for temperature); a seed must be a 64-bit integer."""
    body = {"model": "tiny-base", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 8, "seed": 1}

    def chat(**sampling: Any) -> httpx.Response:
        return httpx.post(f"{live.url}/v1/chat/completions", json={**body, **sampling}, headers=live.query)

    greedy = chat(temperature=0.0)
    assert greedy.status_code == 200, greedy.text
    for sampling in ({"temperature": 9.681311705398036e-138}, {"top_p": 2.2953844839583256e-181}):
        resp = chat(**sampling)
        assert resp.status_code == 200, resp.text
        assert resp.json()["choices"][0]["message"]["content"] == greedy.json()["choices"][0]["message"]["content"]
    for too_wide in (2**64, -(2**63) - 1):
        refused = chat(seed=too_wide)
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "seed", refused.text
    assert chat(seed=2**63 - 1).status_code == 200
