"""`moerge keys create|list|revoke|rotate` on a real SQLite database: options, the secret printed once, a list
without secrets, refusals naming the field with a non-zero exit."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from core.errors import Unauthorized
from core.settings import Settings
from registry import db
from registry.keys import ApiKeyService, hash_key
from tests.fixtures.cli import invoke


def authenticate(secret: str) -> str:
    async def go() -> str:
        engine = db.make_engine(Settings.from_env().database_url)
        try:
            async with db.make_sessionmaker(engine)() as session:
                try:
                    return (await ApiKeyService(session).authenticate(secret, need="query")).name
                except Unauthorized as exc:
                    return exc.message
        finally:
            await engine.dispose()

    return asyncio.run(go())


def test_keys_commands(cli_env: Path) -> None:
    assert invoke("init")[0] == 0
    code, output = invoke("keys", "create", "app", "--model", "tiny-base", "--model", "combo", "--rpm-limit", "5",
                          "--tpm-limit", "1000", "--token-budget", "20000", "--duration", "30d")  # fmt: skip
    assert code == 0, output
    secret = output.strip()
    assert secret.startswith("mk-") and authenticate(secret) == "app"

    code, output = invoke("keys", "list", "--json")
    assert code == 0, output
    assert secret not in output and hash_key(secret) not in output
    rows = {r["name"]: r for r in json.loads(output)}
    app_key = rows["app"]
    assert app_key["prefix"] == secret[:10] and app_key["models"] == ["tiny-base", "combo"]
    assert (app_key["rpm_limit"], app_key["tpm_limit"], app_key["token_budget"]) == (5, 1000, 20000)
    assert app_key["expires_at"] and app_key["status"] == "active" and app_key["usage"]["counted"]
    code, output = invoke("keys", "list")
    assert code == 0 and secret[:10] in output and secret not in output

    code, output = invoke("keys", "rotate", app_key["id"])
    assert code == 0, output
    rotated = output.strip()
    assert rotated.startswith("mk-") and rotated != secret
    assert authenticate(rotated) == "app" and "revoked" in authenticate(secret)

    code, output = invoke("keys", "revoke", rotated[:10])  # by prefix
    assert code == 0 and "revoked app" in output, output
    assert "revoked" in authenticate(rotated)
    assert "app" not in {r["name"] for r in json.loads(invoke("keys", "list", "--json")[1])}
    assert [r["status"] for r in json.loads(invoke("keys", "list", "--all", "--json")[1]) if r["name"] == "app"] == [
        "revoked",
        "revoked",
    ]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("create", "x", "--rpm-limit", "0"), "rpm_limit must be between 1"),
        (("create", "x", "--duration", "forever"), "duration must be a number and a unit"),
        (("create", "x", "--expires-at", "yesterday"), "expires_at must be an ISO date"),
        (("create", "x", "--expires-at", "2001-01-01T00:00:00"), "expires_at must be in the future"),
        (("create", "x", "--scope", "root"), "scopes must be a non-empty subset"),
        (("revoke", "mk-nothere"), "no API key 'mk-nothere'"),
        (("rotate", "00000000-0000-0000-0000-000000000000"), "no API key"),
    ],
)
def test_keys_refusals(cli_env: Path, args: tuple[str, ...], message: str) -> None:
    assert invoke("init")[0] == 0
    before = invoke("keys", "list", "--all", "--json")[1]
    code, output = invoke("keys", *args)
    assert code == 1 and message in output, output
    assert invoke("keys", "list", "--all", "--json")[1] == before
