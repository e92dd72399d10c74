"""A JSON answer's raw control characters inside strings (xgrammar 0.2.8 let the demo's experts write U+0000 in a
string) are escaped, whole or streamed in pieces, and nothing else changes."""

from __future__ import annotations

import json

import pytest

from serving.json_text import JsonText


def test_raw_control_characters_in_strings_are_escaped() -> None:
    raw = '{"answer":"neg\x00ative\x1f","note":"a \\"quoted\\" \\\\ back\x07slash"}'
    with pytest.raises(json.JSONDecodeError):  # the raw text does not parse
        json.loads(raw)
    fixed = JsonText().feed(raw)
    assert json.loads(fixed) == {"answer": "neg\x00ative\x1f", "note": 'a "quoted" \\ back\x07slash'}
    streamed = JsonText()
    assert "".join(streamed.feed(raw[i : i + 3]) for i in range(0, len(raw), 3)) == fixed  # state across pieces


def test_valid_json_is_left_alone() -> None:
    for text in ('{"a":[1,2,{"b":"c\\nd"}]}', '{\n  "a": "\\u0000"\n}', '"plain"', "[]"):
        assert JsonText().feed(text) == text
