"""The OpenAPI schema at /api/schema describes what /api and /v1 return: every handler declares a typed answer
(a msgspec struct, not ``dict[str, Any]``), so each response has a named schema with its properties.

The admin panel's pages (/admin, HTML) are outside the walk: they answer templates, not JSON."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from litestar import Litestar
from litestar.handlers import HTTPRouteHandler
from litestar.response import Response
from litestar.routes import HTTPRoute
from litestar.testing import TestClient

from api.app import create_app
from serving.torch_engine import TorchEngine
from tests.fixtures.db import RegistryEnv

# Handlers whose answer is not one JSON type, each with the reason. Those that still have a JSON form document it
# with `responses={200: ResponseSpec(...)}`, which the schema checks below see.
UNTYPED = {
    ("POST", "/v1/chat/completions"): "a ChatCompletion, or an SSE stream with `stream: true` (documented)",
    ("POST", "/v1/completions"): "a Completion, or an SSE stream with `stream: true` (documented)",
    ("POST", "/v1/responses"): "a Response, or an SSE stream with `stream: true` (documented)",
    ("GET", "/api/experts/{ref:str}/card"): "markdown by default; ExpertCard with ?format=json (documented)",
    ("GET", "/api/experts/{ref:str}/training-data"): "TrainingData (documented), or the JSONL with ?format=jsonl",
    ("GET", "/api/merges/{job_id:str}/events"): "an SSE stream of progress events",
    ("GET", "/api/jobs/{job_id:str}/events"): "an SSE stream of progress events",
    ("GET", "/api/experts/{ref:str}/files/{name:path}"): "a file's bytes, whole or one byte range (206)",
}
DOCUMENTED = {key for key, why in UNTYPED.items() if "(documented)" in why}


@pytest.fixture
def app(registry_env: RegistryEnv) -> Litestar:
    return create_app(registry_env.settings, engine=TorchEngine())


@pytest.fixture
def schema(app: Litestar) -> Iterator[dict[str, Any]]:
    with TestClient(app) as client:
        resp = client.get("/api/schema/openapi.json")
        assert resp.status_code == 200, resp.text
        yield resp.json()


def _handlers(app: Litestar) -> Iterator[tuple[str, str, HTTPRouteHandler]]:
    for route in app.routes:
        if not isinstance(route, HTTPRoute) or not route.path.startswith(("/api", "/v1")):
            continue
        if route.path.startswith("/api/schema"):  # Litestar's own schema pages
            continue
        for handler in route.route_handlers:
            for method in handler.http_methods:
                yield method, route.path, handler


def _untyped(annotation: Any) -> bool:
    """``Any``, ``dict[str, Any]`` or a Response of either: an answer the schema cannot describe."""
    if annotation is Any or annotation == dict[str, Any] or annotation is dict:
        return True
    origin = getattr(annotation, "__origin__", None)
    if origin is not None and isinstance(origin, type) and issubclass(origin, Response):
        return any(_untyped(arg) for arg in annotation.__args__)
    return isinstance(annotation, type) and issubclass(annotation, Response)  # a bare Response


def test_every_handler_declares_a_typed_response(app: Litestar) -> None:
    seen = set()
    untyped = []
    for method, path, handler in _handlers(app):
        seen.add((method, path))
        annotation = handler.parsed_fn_signature.return_type.annotation
        if _untyped(annotation) and (method, path) not in UNTYPED:
            untyped.append(f"{method} {path} -> {annotation}")
    assert not untyped, "handlers without a typed response:\n" + "\n".join(untyped)
    assert set(UNTYPED) <= seen, f"listed but gone: {set(UNTYPED) - seen}"  # keep the list honest
    assert len(seen) >= 30


def _resolve(schema: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in node:
        node = schema["components"]["schemas"][node["$ref"].rsplit("/", 1)[1]]
    return node


def _response(schema: dict[str, Any], method: str, path: str) -> tuple[str, dict[str, Any]]:
    """(the component's name, its schema) of an operation's success answer."""
    operation = schema["paths"][path][method.lower()]
    status = next(code for code in operation["responses"] if code.startswith("2"))
    node = operation["responses"][status]["content"]["application/json"]["schema"]
    assert "$ref" in node, f"{method} {path}: an inline, unnamed schema {node}"
    return node["$ref"].rsplit("/", 1)[1], _resolve(schema, node)


@pytest.mark.parametrize(
    ("method", "path", "name", "fields"),
    [
        ("GET", "/api/experts/{ref}", "ExpertOut", {"id", "slug", "kind", "lineage", "compatibility", "integrity"}),
        ("PATCH", "/api/experts/{ref}", "ExpertOut", {"id", "slug"}),
        ("GET", "/api/compositions", "CompositionList", {"object", "data"}),
        ("GET", "/api/compositions/{name}", "CompositionOut", {"name", "router", "experts", "k", "aggregator"}),
        ("POST", "/api/route", "RouteOut", {"model", "query", "router", "experts", "scores", "answered_by", "trace"}),
        ("GET", "/api/merges/{job_id}", "JobOut", {"id", "status", "progress", "result_expert", "inputs"}),
        ("POST", "/api/merges/{job_id}/cancel", "JobOut", {"id", "status"}),
        ("GET", "/api/keys/{key_id}", "KeyOut", {"id", "name", "prefix", "scopes", "usage"}),
        ("GET", "/api/engines", "Engines", {"engine", "servers"}),
        ("GET", "/api/strategies", "Strategies", {"routers", "token_routers", "aggregators", "merge_methods"}),
        ("GET", "/api/health", "Health", {"status", "version", "checks"}),
        ("GET", "/api/ready", "Ready", {"status"}),
        ("GET", "/v1/models", "ModelList", {"object", "data"}),
        ("POST", "/v1/chat/completions", "ChatCompletion", {"id", "object", "created", "model", "choices", "usage"}),
        ("POST", "/v1/completions", "Completion", {"id", "object", "created", "model", "choices", "usage"}),
        ("GET", "/api/experts/{ref}/card", "ExpertCard", {"metadata", "body", "markdown"}),
    ],
)
def test_responses_have_named_properties(
    schema: dict[str, Any], method: str, path: str, name: str, fields: set[str]
) -> None:
    got, component = _response(schema, method, path)
    assert got == name
    assert fields <= set(component.get("properties", {})), component


@pytest.mark.parametrize(
    ("path", "item"),
    [("/api/experts", "ExpertOut"), ("/api/merges", "JobOut"), ("/api/jobs", "JobOut"), ("/api/keys", "KeyOut")],
)
def test_paginated_lists_share_one_page_type(schema: dict[str, Any], path: str, item: str) -> None:
    name, page = _response(schema, "GET", path)
    assert name.startswith("Page")
    assert set(page["properties"]) == {"object", "data", "total", "limit", "offset"}
    assert page["properties"]["data"]["items"] == {"$ref": f"#/components/schemas/{item}"}


def _present(schema: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    """A nullable field's schema when it is not null."""
    node = _resolve(schema, node)
    for alternative in node.get("oneOf", node.get("anyOf", [node])):
        resolved = _resolve(schema, alternative)
        if resolved.get("type") != "null":
            return resolved
    raise AssertionError(f"only null: {node}")


def test_nested_shapes_are_described(schema: dict[str, Any]) -> None:
    """Down to the leaves a client reads: a model entry's `moerge`, a choice's message, the usage."""
    models = _response(schema, "GET", "/v1/models")[1]
    card = _resolve(schema, models["properties"]["data"]["items"])
    assert {"id", "object", "created", "owned_by", "root", "parent", "moerge"} <= set(card["properties"])
    assert {"kind", "expert_id", "router", "k"} <= set(_resolve(schema, card["properties"]["moerge"])["properties"])
    chat = _response(schema, "POST", "/v1/chat/completions")[1]
    choice = _resolve(schema, chat["properties"]["choices"]["items"])
    assert {"index", "message", "finish_reason", "logprobs"} <= set(choice["properties"])
    message = _resolve(schema, choice["properties"]["message"])
    assert set(message["properties"]) == {"role", "content", "tool_calls"}
    call = _resolve(schema, _present(schema, message["properties"]["tool_calls"])["items"])
    assert set(_resolve(schema, call["properties"]["function"])["properties"]) == {"name", "arguments"}
    logprobs = _present(schema, choice["properties"]["logprobs"])
    token = _resolve(schema, _present(schema, logprobs["properties"]["content"])["items"])
    assert {"token", "logprob", "bytes", "top_logprobs"} <= set(token["properties"])
    usage = _resolve(schema, chat["properties"]["usage"])
    assert set(usage["properties"]) == {"prompt_tokens", "completion_tokens", "total_tokens"}


def test_documented_untyped_handlers_are_in_the_schema(schema: dict[str, Any]) -> None:
    for method, path in DOCUMENTED:
        _response(schema, method, path.replace(":str", ""))  # a named JSON schema despite Response[Any]


def test_strategies_lists_each_registry_with_help_behind_a_query_key(app: Litestar, registry_env: RegistryEnv) -> None:
    from aggregators import AGGREGATORS
    from merging.methods import METHODS
    from routers.query import ROUTERS
    from routers.token import TOKEN_ROUTERS

    with TestClient(app) as client:
        assert client.get("/api/strategies").status_code == 401
        listed = client.get("/api/strategies", headers=registry_env.query).json()
    for kind, registry in [
        ("routers", ROUTERS),
        ("token_routers", TOKEN_ROUTERS),
        ("aggregators", AGGREGATORS),
        ("merge_methods", METHODS),
    ]:
        assert [entry["name"] for entry in listed[kind]] == list(registry.names()), kind
        assert all(entry["help"] for entry in listed[kind]), kind
    embedding = next(entry for entry in listed["routers"] if entry["name"] == "embedding")
    assert any(p["name"] == "threshold" and p["help"] for p in embedding["params"])
