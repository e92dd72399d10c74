"""Per-key limits through a real HTTP server (uvicorn, torch engine on a tiny model), on SQLite and
PostgreSQL: requests per minute, tokens per minute and a token budget, each exceeded limit a 429 in the OpenAI
shape (`rate_limit_error`, `param` naming the limit, a `code`) with Retry-After for the per-minute ones (the
official client raises RateLimitError); the tokens of answers, streamed or not, are charged; a refused request
counts for nothing; a key without limits writes nothing per request."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from sqlalchemy import event
from sqlalchemy.engine import Engine

from registry.schemas import ExpertSpec
from serving.torch_engine import TorchEngine
from tests.fixtures.db import BACKENDS, RegistryEnv
from tests.fixtures.live import register, serve

pytestmark = pytest.mark.parametrize("database_url", BACKENDS, indirect=True)

CHAT = {"model": "tiny-base", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 3, "temperature": 0}


def fresh_minute(needed_s: float = 15) -> None:
    """Per-minute windows are clock minutes: start a test that needs them with ``needed_s`` left in this one."""
    left = 60 - time.time() % 60
    if left < needed_s:
        time.sleep(left + 0.05)


@pytest.fixture
def live(registry_env: RegistryEnv, tiny_base: Path) -> Iterator[dict[str, Any]]:
    register(registry_env.settings, tiny_base, ExpertSpec(slug="tiny-base"))
    with serve(registry_env.settings, TorchEngine()) as url:
        yield {"url": url, "env": registry_env}


def new_key(live: dict[str, Any], **settings: Any) -> dict[str, Any]:
    resp = httpx.post(f"{live['url']}/api/keys", json={"name": "limited", **settings}, headers=live["env"].admin)
    assert resp.status_code == 201, resp.text
    return resp.json()  # type: ignore[no-any-return]


def usage(live: dict[str, Any], key: dict[str, Any]) -> dict[str, Any]:
    resp = httpx.get(f"{live['url']}/api/keys/{key['id']}", headers=live["env"].admin)
    return resp.json()["usage"]  # type: ignore[no-any-return]


def call(live: dict[str, Any], key: dict[str, Any], path: str = "/v1/models", body: Any = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key['key']}"}
    if body is None:
        return httpx.get(f"{live['url']}{path}", headers=headers, timeout=60)
    return httpx.post(f"{live['url']}{path}", json=body, headers=headers, timeout=60)


def assert_429(resp: httpx.Response, param: str, code: str, *, retry: bool) -> dict[str, Any]:
    assert resp.status_code == 429, resp.text
    error = resp.json()["error"]
    assert error["type"] == "rate_limit_error" and error["param"] == param and error["code"] == code, error
    if retry:
        assert 1 <= int(resp.headers["retry-after"]) <= 60
    else:
        assert "retry-after" not in resp.headers
    return error  # type: ignore[no-any-return]


def test_requests_per_minute(live: dict[str, Any]) -> None:
    fresh_minute()
    key = new_key(live, rpm_limit=3)
    assert [call(live, key).status_code for _ in range(3)] == [200, 200, 200]
    for _ in range(2):
        error = assert_429(call(live, key), "rpm_limit", "rpm_limit_exceeded", retry=True)
        assert "3 requests per minute" in error["message"]
    # every authenticated route counts, and the refusals were not counted
    assert_429(call(live, key, "/api/experts"), "rpm_limit", "rpm_limit_exceeded", retry=True)
    assert usage(live, key) == {"counted": True, "requests": 3, "tokens": 0, "minute_requests": 3, "minute_tokens": 0}
    # the official client sees a RateLimitError with the same body
    client = openai.OpenAI(base_url=f"{live['url']}/v1", api_key=key["key"], max_retries=0)
    with pytest.raises(openai.RateLimitError) as caught:
        client.models.list()
    assert caught.value.response.headers["retry-after"]
    assert isinstance(caught.value.body, dict) and caught.value.body["param"] == "rpm_limit"


def test_tokens_per_minute(live: dict[str, Any]) -> None:
    fresh_minute()
    key = new_key(live, tpm_limit=5)
    first = call(live, key, "/v1/chat/completions", CHAT)  # the window is empty: admitted
    assert first.status_code == 200, first.text
    spent = first.json()["usage"]["total_tokens"]
    assert spent > 5
    seen = usage(live, key)
    assert seen["tokens"] == spent and seen["minute_tokens"] == spent and seen["requests"] == 1
    error = assert_429(call(live, key, "/v1/chat/completions", CHAT), "tpm_limit", "tpm_limit_exceeded", retry=True)
    assert "5 tokens per minute" in error["message"]
    assert_429(call(live, key), "tpm_limit", "tpm_limit_exceeded", retry=True)  # the window is spent for any route
    assert usage(live, key)["tokens"] == spent


def test_token_budget_streamed_and_not(live: dict[str, Any]) -> None:
    key = new_key(live, token_budget=60)
    spent = 0
    stream_body = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
    for i in range(100):
        resp = call(live, key, "/v1/chat/completions", stream_body if i % 2 == 0 else CHAT)
        if resp.status_code == 429:
            break
        assert resp.status_code == 200, resp.text
        if resp.headers["content-type"].startswith("text/event-stream"):
            events = [json.loads(line[6:]) for line in resp.text.splitlines() if line.startswith("data: {")]
            spent += events[-1]["usage"]["total_tokens"]
        else:
            spent += resp.json()["usage"]["total_tokens"]
        assert usage(live, key)["tokens"] == spent  # charged before the answer ended
    assert spent >= 60
    error = assert_429(resp, "token_budget", "budget_exceeded", retry=False)
    assert "exhausted" in error["message"] and "does not renew" in error["message"]
    assert_429(call(live, key), "token_budget", "budget_exceeded", retry=False)
    # a stream without include_usage is charged too (what the engine counted)
    other = new_key(live, token_budget=10_000)
    resp = call(live, other, "/v1/chat/completions", {**CHAT, "stream": True})
    assert resp.status_code == 200 and "data: [DONE]" in resp.text
    assert usage(live, other)["tokens"] > 0


def test_a_key_without_limits_writes_nothing_per_request(live: dict[str, Any]) -> None:
    """The cheap path: a key without limits is one memoized lookup (re-read at most once a second) and no
    write per request (``last_used_at`` at most once a minute); a key with limits writes on each."""
    statements: list[str] = []

    def seen(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        statements.append(statement.lstrip().split(None, 1)[0].upper() + " " + statement)

    env: RegistryEnv = live["env"]
    unlimited = {"Authorization": f"Bearer {env.query_key}"}
    limited = new_key(live, rpm_limit=1000)
    time.sleep(0.5)  # the admin key's own last_used_at write (off the request path) lands before we count
    event.listen(Engine, "before_cursor_execute", seen)
    try:
        started = time.monotonic()
        for _ in range(30):
            assert httpx.get(f"{live['url']}/v1/models", headers=unlimited).status_code == 200
        took = time.monotonic() - started
        time.sleep(0.3)  # a last_used_at write, if any, runs off the request path
        writes = [s for s in statements if s.split(None, 1)[0] in ("INSERT", "UPDATE", "DELETE")]
        lookups = [s for s in statements if "FROM api_keys" in s and s.startswith("SELECT")]
        assert len(writes) <= 1, writes  # at most last_used_at, once
        assert len(lookups) <= took + 2, (len(lookups), took)
        statements.clear()
        fresh_minute(5)
        for _ in range(10):
            assert call(live, limited).status_code == 200
        counted = [s for s in statements if s.startswith("INSERT") and "key_usage" in s]
        assert len(counted) == 10
    finally:
        event.remove(Engine, "before_cursor_execute", seen)
