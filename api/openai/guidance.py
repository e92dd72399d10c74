"""OpenAI's ``response_format`` and ``tools`` / ``tool_choice`` checked before anything runs: their shapes, the JSON
Schemas they carry (bounded in depth and checked as schemas), the tools' names; the result is the ``Guidance``
the engines decode under (``serving/engine.py``). A chat's assistant ``tool_calls`` and ``tool`` messages are
checked here too."""

from __future__ import annotations

import json
import re
from typing import Any

import jsonschema
import jsonschema.exceptions
import jsonschema.validators

from core.errors import ValidationFailed
from serving.engine import Guidance

MAX_TOOLS = 64
MAX_SCHEMA_DEPTH = 32  # nesting of a schema's objects and arrays (grammar compilers recurse over it)
MAX_SCHEMA_BYTES = 32 * 1024  # one schema, as JSON: a grammar is compiled from it before the first token
MAX_DESCRIPTION = 8192
NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule for function and schema names
TOOL_CHOICES = ("none", "auto", "required")


def _refuse(reason: str, param: str) -> ValidationFailed:
    return ValidationFailed(reason, param=param)


def _only(value: dict[str, Any], allowed: set[str], param: str) -> None:
    if unknown := sorted(set(value) - allowed):
        raise _refuse(f"unknown field {unknown[0]!r}", f"{param}.{unknown[0]}")


def _depth(value: Any, limit: int) -> int:
    """How deep ``value`` nests (dicts and lists), counting no further than ``limit`` + 1."""
    stack = [(value, 1)]
    deepest = 0
    while stack:
        item, depth = stack.pop()
        deepest = max(deepest, depth)
        if depth > limit:
            return depth
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return deepest


def checked_schema(schema: Any, param: str) -> dict[str, Any]:
    """A JSON Schema a caller sent: an object, at most ``MAX_SCHEMA_DEPTH`` deep, valid under its own draft."""
    if not isinstance(schema, dict):
        raise _refuse("must be a JSON Schema (an object)", param)
    if _depth(schema, MAX_SCHEMA_DEPTH) > MAX_SCHEMA_DEPTH:
        raise _refuse(f"nests deeper than {MAX_SCHEMA_DEPTH} levels", param)
    if len(json.dumps(schema)) > MAX_SCHEMA_BYTES:
        raise _refuse(f"is larger than {MAX_SCHEMA_BYTES // 1024} KiB as JSON", param)
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.exceptions.SchemaError as exc:
        where = "/".join(str(p) for p in exc.path)
        raise _refuse(f"not a valid JSON Schema{f' at {where}' if where else ''}: {exc.message[:300]}", param) from None
    except (RecursionError, jsonschema.exceptions.RefResolutionError):  # pragma: no cover - bounded above
        raise _refuse("not a usable JSON Schema", param) from None
    return schema


def _text(value: Any, param: str) -> str:
    if not isinstance(value, str) or len(value) > MAX_DESCRIPTION:
        raise _refuse(f"must be a string of at most {MAX_DESCRIPTION} characters", param)
    return value


def _name(value: Any, param: str) -> str:
    if not isinstance(value, str) or not NAME.match(value):
        raise _refuse("must be 1 to 64 letters, digits, underscores or dashes", param)
    return value


def checked_response_format(value: dict[str, Any] | None) -> dict[str, Any] | None:
    """``response_format``: None for free text; ``{"type": "json_object"}``; or ``json_schema`` with a name and a
    valid schema (``strict`` accepted: vLLM always decodes a schema strictly)."""
    param = "response_format"
    if value is None:
        return None
    kind = value.get("type")
    if kind == "text":
        _only(value, {"type"}, param)
        return None
    if kind == "json_object":
        _only(value, {"type"}, param)
        return {"type": "json_object"}
    if kind != "json_schema":
        raise _refuse(f"type must be text, json_object or json_schema; got {kind!r}", f"{param}.type")
    _only(value, {"type", "json_schema"}, param)
    spec = value.get("json_schema")
    where = f"{param}.json_schema"
    if not isinstance(spec, dict):
        raise _refuse("json_schema (name, schema, strict) is required with type json_schema", where)
    _only(spec, {"name", "schema", "strict", "description"}, where)
    checked: dict[str, Any] = {"name": _name(spec.get("name"), f"{where}.name")}
    if "schema" not in spec:
        raise _refuse("the schema is required", f"{where}.schema")
    checked["schema"] = checked_schema(spec["schema"], f"{where}.schema")
    if spec.get("strict") is not None:
        if not isinstance(spec["strict"], bool):
            raise _refuse("must be true or false", f"{where}.strict")
        checked["strict"] = spec["strict"]
    if spec.get("description") is not None:
        checked["description"] = _text(spec["description"], f"{where}.description")
    return {"type": "json_schema", "json_schema": checked}


def checked_tools(tools: list[Any] | None) -> tuple[dict[str, Any], ...]:
    """``tools``: at most ``MAX_TOOLS`` functions with unique names, each with an optional description and a
    JSON Schema of its parameters."""
    if tools is None:
        return ()
    if not 1 <= len(tools) <= MAX_TOOLS:
        raise _refuse(f"give 1 to {MAX_TOOLS} tools (or leave tools out)", "tools")
    checked: list[dict[str, Any]] = []
    names: set[str] = set()
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(tool, dict) or tool.get("type") != "function":
            raise _refuse('each tool must be {"type": "function", "function": {...}}', f"{where}.type")
        _only(tool, {"type", "function"}, where)
        function = tool.get("function")
        if not isinstance(function, dict):
            raise _refuse("the function (name, description, parameters) is required", f"{where}.function")
        where = f"{where}.function"
        _only(function, {"name", "description", "parameters", "strict"}, where)
        name = _name(function.get("name"), f"{where}.name")
        if name in names:
            raise _refuse(f"two tools are named {name!r}", f"{where}.name")
        names.add(name)
        spec: dict[str, Any] = {"name": name}
        if function.get("description") is not None:
            spec["description"] = _text(function["description"], f"{where}.description")
        if function.get("parameters") is not None:
            spec["parameters"] = checked_schema(function["parameters"], f"{where}.parameters")
        if function.get("strict") is not None:
            if not isinstance(function["strict"], bool):
                raise _refuse("must be true or false", f"{where}.strict")
            spec["strict"] = function["strict"]
        checked.append({"type": "function", "function": spec})
    return tuple(checked)


def checked_tool_choice(choice: Any, tools: tuple[dict[str, Any], ...]) -> str | dict[str, Any] | None:
    """``tool_choice``: none, auto (the default with tools), required, or a named function of ``tools``."""
    param = "tool_choice"
    if choice is None:
        return "auto" if tools else None
    if isinstance(choice, str):
        if choice not in TOOL_CHOICES:
            raise _refuse(f"must be one of {', '.join(TOOL_CHOICES)} or a named function", param)
        if choice != "none" and not tools:
            raise _refuse(f"tool_choice {choice!r} needs tools", param)
        return choice
    if not isinstance(choice, dict) or choice.get("type") != "function" or not isinstance(choice.get("function"), dict):
        raise _refuse('a named function is {"type": "function", "function": {"name": ...}}', param)
    _only(choice, {"type", "function"}, param)
    name = choice["function"].get("name")
    known = [t["function"]["name"] for t in tools]
    if name not in known:
        raise _refuse(f"names no tool of this request ({', '.join(known) or 'none given'})", f"{param}.function.name")
    return {"type": "function", "function": {"name": name}}


def guidance_of(
    response_format: dict[str, Any] | None,
    tools: list[Any] | None,
    tool_choice: Any,
    parallel_tool_calls: bool | None,
) -> Guidance | None:
    """The request's guidance, checked; None when it asks for free text without tools."""
    checked_format = checked_response_format(response_format)
    checked = checked_tools(tools)
    choice = checked_tool_choice(tool_choice, checked)
    if checked_format is not None and checked and choice != "none":
        raise _refuse("ask for a response_format or for tool calls, not both", "response_format")
    if checked_format is None and not checked:
        return None
    return Guidance(
        response_format=checked_format,
        tools=checked,
        tool_choice=choice,
        parallel_tool_calls=parallel_tool_calls if checked else None,
    )


def checked_tool_calls(value: Any, where: str) -> list[dict[str, Any]]:
    """An assistant message's ``tool_calls`` (a conversation handed back): each an id, ``function`` with its name
    and its arguments as a string."""
    if not isinstance(value, list) or not 1 <= len(value) <= MAX_TOOLS:
        raise _refuse(f"must be a list of 1 to {MAX_TOOLS} tool calls", where)
    calls = []
    for j, call in enumerate(value):
        at = f"{where}[{j}]"
        if not isinstance(call, dict) or call.get("type", "function") != "function":
            raise _refuse('each call must be {"id", "type": "function", "function": {"name", "arguments"}}', at)
        _only(call, {"id", "type", "function"}, at)
        function = call.get("function")
        if not isinstance(call.get("id"), str) or not call["id"] or len(call["id"]) > 256:
            raise _refuse("the call's id is required (a string)", f"{at}.id")
        if not isinstance(function, dict):
            raise _refuse("the function (name, arguments) is required", f"{at}.function")
        _only(function, {"name", "arguments"}, f"{at}.function")
        name = _name(function.get("name"), f"{at}.function.name")
        arguments = function.get("arguments")
        if not isinstance(arguments, str):
            raise _refuse("arguments are a JSON string", f"{at}.function.arguments")
        calls.append({"id": call["id"], "type": "function", "function": {"name": name, "arguments": arguments}})
    return calls
