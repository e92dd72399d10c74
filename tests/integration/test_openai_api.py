"""/v1 through a real HTTP server (uvicorn) and the official `openai` client, on tiny models served in
process by the torch engine. The vLLM path is covered in test_v1_vllm.py."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from registry.schemas import ExpertSpec
from serving.torch_engine import TorchEngine
from tests.fixtures.db import RegistryEnv
from tests.fixtures.live import register, serve
from tests.fixtures.tiny import build_tiny_lora


@pytest.fixture
def live(registry_env: RegistryEnv, tiny_base: Path, tiny_lora: Path, tmp_path: Path) -> Iterator[dict[str, Any]]:
    """A uvicorn server on a free port with a tiny base and two adapters registered."""
    settings = registry_env.settings
    register(settings, tiny_base, ExpertSpec(slug="tiny-base"))
    register(settings, tiny_lora, ExpertSpec(slug="lora-a", base="tiny-base"))
    other = build_tiny_lora(tiny_base, tmp_path / "lora-b", seed=7)
    register(settings, other, ExpertSpec(slug="lora-b", base="tiny-base"))
    with serve(settings, TorchEngine()) as url:
        yield {
            "url": url,
            "env": registry_env,
            "client": openai.OpenAI(base_url=f"{url}/v1", api_key=registry_env.query_key, max_retries=0),
        }


CHAT = [{"role": "user", "content": "hello"}]


def test_models_lists_bases_and_adapters(live: dict[str, Any]) -> None:
    models = {m.id: m for m in live["client"].models.list()}
    assert set(models) == {"tiny-base", "lora-a", "lora-b"}
    assert models["lora-a"].model_extra["parent"] == "tiny-base"
    assert models["tiny-base"].model_extra["parent"] is None


def test_chat_through_openai_client(live: dict[str, Any]) -> None:
    client: openai.OpenAI = live["client"]
    raw = client.chat.completions.with_raw_response.create(model="lora-a", messages=CHAT, max_tokens=8, temperature=0)
    reply = raw.parse()
    assert reply.model == "lora-a" and reply.object == "chat.completion"
    assert reply.choices[0].message.role == "assistant" and reply.choices[0].message.content
    assert reply.usage.completion_tokens > 0 and reply.usage.prompt_tokens > 0
    assert raw.headers["x-moerge-router"] == "none" and raw.headers["x-moerge-experts"] == "lora-a"
    assert raw.headers["x-moerge-weights"] == "1" and raw.headers["x-moerge-engine"] == "torch"
    # the adapter is applied: on the seeded tiny models "hello" continues differently with and without it
    texts = {
        m: client.completions.create(model=m, prompt="hello", max_tokens=8, temperature=0).choices[0].text
        for m in ("tiny-base", "lora-a", "lora-b")
    }
    assert len(set(texts.values())) == 3, texts


def test_streaming_matches_non_streaming(live: dict[str, Any]) -> None:
    client: openai.OpenAI = live["client"]
    full = client.chat.completions.create(model="lora-b", messages=CHAT, max_tokens=10, temperature=0)
    pieces, finish, usage = [], None, None
    for chunk in client.chat.completions.create(
        model="lora-b", messages=CHAT, max_tokens=10, temperature=0, stream=True, stream_options={"include_usage": True}
    ):
        assert chunk.model == "lora-b"  # every event names what answers
        if chunk.usage:
            usage = chunk.usage
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    assert "".join(pieces) == full.choices[0].message.content
    assert finish == full.choices[0].finish_reason
    assert usage is not None and usage.completion_tokens == full.usage.completion_tokens
    # the raw stream is SSE ending in [DONE]
    with httpx.stream(
        "POST",
        f"{live['url']}/v1/chat/completions",
        headers={"authorization": f"Bearer {live['env'].query_key}"},
        json={"model": "lora-b", "messages": CHAT, "max_tokens": 4, "stream": True},
    ) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        assert resp.headers["x-moerge-experts"] == "lora-b" and resp.headers["x-moerge-engine"] == "torch"
        lines = [line for line in resp.iter_lines() if line]
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)


def test_completions_endpoint(live: dict[str, Any]) -> None:
    client: openai.OpenAI = live["client"]
    reply = client.completions.create(model="tiny-base", prompt="The sky is", max_tokens=6, temperature=0)
    assert reply.object == "text_completion" and reply.choices[0].text and reply.usage.completion_tokens <= 6
    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(
            model="tiny-base", prompt="The sky is", max_tokens=6, temperature=0, stream=True
        )
        if c.choices
    )
    assert streamed == reply.choices[0].text


def test_errors_in_openai_shape(live: dict[str, Any]) -> None:
    client: openai.OpenAI = live["client"]
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="nope", messages=CHAT)
    assert missing.value.body["param"] == "model" and "does not exist" in missing.value.body["message"]
    assert missing.value.response.headers["x-moerge-router"] == "none"
    with pytest.raises(openai.BadRequestError) as bad_role:
        client.chat.completions.create(model="tiny-base", messages=[{"role": "robot", "content": "x"}])
    assert bad_role.value.body["param"] == "messages[0].role"
    with pytest.raises(openai.BadRequestError) as bad_temp:
        client.chat.completions.create(model="tiny-base", messages=CHAT, temperature=3)
    assert bad_temp.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as empty:
        client.chat.completions.create(model="tiny-base", messages=[])
    assert empty.value.body["param"] == "messages"
    with pytest.raises(openai.BadRequestError) as unknown:
        client.chat.completions.create(model="tiny-base", messages=CHAT, extra_body={"colour": "red"})
    assert unknown.value.body["param"] == "colour"
    with pytest.raises(openai.BadRequestError) as max_tokens:
        client.chat.completions.create(model="tiny-base", messages=CHAT, max_tokens=0)
    assert max_tokens.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError) as min_tokens:
        client.chat.completions.create(model="tiny-base", messages=CHAT, max_tokens=4, extra_body={"min_tokens": 5})
    assert min_tokens.value.body["param"] == "min_tokens" and "max_tokens" in min_tokens.value.body["message"]
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{live['url']}/v1", api_key="wrong-key-wrong-key", max_retries=0).models.list()


def test_direct_composition(live: dict[str, Any]) -> None:
    admin = {"authorization": f"Bearer {live['env'].admin_key}"}
    resp = httpx.post(
        f"{live['url']}/api/compositions",
        headers=admin,
        json={"name": "dates", "router": "direct", "experts": ["lora-a"]},
    )
    assert resp.status_code == 201, resp.text
    bad = httpx.post(
        f"{live['url']}/api/compositions",
        headers=admin,
        json={"name": "two", "router": "direct", "experts": ["lora-a", "lora-b"]},
    )
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "experts"
    missing = httpx.post(
        f"{live['url']}/api/compositions",
        headers=admin,
        json={"name": "ghost", "router": "direct", "experts": ["nobody"]},
    )
    assert missing.status_code == 404 and missing.json()["error"]["param"] == "experts[0]"

    client: openai.OpenAI = live["client"]
    raw = client.chat.completions.with_raw_response.create(model="dates", messages=CHAT, max_tokens=6, temperature=0)
    direct = client.chat.completions.create(model="lora-a", messages=CHAT, max_tokens=6, temperature=0)
    assert raw.parse().choices[0].message.content == direct.choices[0].message.content
    assert raw.parse().model == "dates"
    assert raw.headers["x-moerge-router"] == "direct" and raw.headers["x-moerge-experts"] == "lora-a"
    assert "dates" in {m.id for m in client.models.list()}

    # its expert force-deleted: a clear error at query time, routing headers included
    assert httpx.delete(f"{live['url']}/api/experts/lora-a", params={"force": True}, headers=admin).status_code == 204
    with pytest.raises(openai.ConflictError) as gone:
        client.chat.completions.create(model="dates", messages=CHAT)
    assert gone.value.body["code"] == "composition_expert_deleted" and "lora-a" in gone.value.body["message"]
    assert gone.value.response.headers["x-moerge-router"] == "direct"


def test_cli_query_against_the_server(live: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from api.cli import app

    monkeypatch.setenv("MOERGE_URL", live["url"])
    monkeypatch.setenv("MOERGE_API_KEY", live["env"].query_key)
    expected = live["client"].chat.completions.create(model="lora-a", messages=CHAT, max_tokens=6, temperature=0)
    text = expected.choices[0].message.content
    plain = CliRunner().invoke(app, ["query", "lora-a", "hello", "--max-tokens", "6", "--no-stream"])
    assert plain.exit_code == 0 and plain.stdout == text + "\n"
    streamed = CliRunner().invoke(app, ["query", "lora-a", "hello", "--max-tokens", "6", "--route"])
    assert streamed.exit_code == 0 and streamed.stdout == text + "\n"
    assert "x-moerge-experts: lora-a" in streamed.stderr
    missing = CliRunner().invoke(app, ["query", "nope", "hello"])
    assert missing.exit_code == 1 and "does not exist" in missing.stderr
