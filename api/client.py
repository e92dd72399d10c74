"""A small synchronous client of moerge's own API, for the CLI (`query`, `eval`)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import httpx

from core.errors import MoergeError, NotFound, Unauthorized, ValidationFailed
from serving.engine import EngineUnavailable


class ApiError(MoergeError):
    status_code = 502


def _raise_for(resp: httpx.Response) -> None:
    if resp.status_code < 400:
        return
    try:
        error = resp.json()["error"]
        message, param = error.get("message", resp.text), error.get("param")
    except (ValueError, KeyError, TypeError):
        message, param = resp.text[:300], None
    kinds: dict[int, type[MoergeError]] = {400: ValidationFailed, 401: Unauthorized, 404: NotFound}
    if resp.status_code == 503:
        raise EngineUnavailable(message, retry_after=int(resp.headers.get("retry-after", "30")), param=param)
    raise kinds.get(resp.status_code, ApiError)(f"{resp.status_code}: {message}", param=param)


class ApiClient:
    def __init__(self, base_url: str, api_key: str | None, *, timeout: float = 600.0) -> None:
        headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=base_url, headers=headers, timeout=timeout)

    def _post(self, path: str, body: dict[str, Any]) -> httpx.Response:
        try:
            return self.http.post(path, json=body)
        except httpx.ConnectError as exc:
            raise EngineUnavailable(
                f"no moerge server at {self.http.base_url} (start one with `moerge serve`)", param="url"
            ) from exc

    def wait_ready(self, model: str, *, timeout_s: float = 600) -> None:
        """Send a one-token request until the engine answers (it starts lazily on first use)."""
        import time

        deadline = time.monotonic() + timeout_s
        while True:
            try:
                self.chat({"model": model, "max_tokens": 1, "messages": [{"role": "user", "content": "hi"}]})
                return
            except EngineUnavailable as exc:
                if time.monotonic() > deadline:
                    raise
                time.sleep(min(5, max(1, exc.retry_after)))

    def add_eval(self, expert: str, result: dict[str, Any]) -> None:
        resp = self._post(f"/api/experts/{expert}/evals", result)
        _raise_for(resp)

    def route(self, model: str, query: str) -> tuple[dict[str, Any], httpx.Headers]:
        resp = self._post("/api/route", {"model": model, "query": query})
        _raise_for(resp)
        return resp.json(), resp.headers

    def chat(self, body: dict[str, Any]) -> tuple[dict[str, Any], httpx.Headers]:
        resp = self._post("/v1/chat/completions", {**body, "stream": False})
        _raise_for(resp)
        return resp.json(), resp.headers

    def chat_stream(self, body: dict[str, Any], *, on_text: Callable[[str], object]) -> httpx.Headers:
        try:
            with self.http.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as resp:
                if resp.status_code >= 400:
                    resp.read()
                    _raise_for(resp)
                for line in resp.iter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    event = json.loads(line[6:])
                    if "error" in event:
                        raise ApiError(
                            event["error"].get("message", "stream failed"), param=event["error"].get("param")
                        )
                    for choice in event.get("choices", []):
                        if piece := choice.get("delta", {}).get("content"):
                            on_text(piece)
                return resp.headers
        except httpx.ConnectError as exc:
            raise EngineUnavailable(
                f"no moerge server at {self.http.base_url} (start one with `moerge serve`)", param="url"
            ) from exc
