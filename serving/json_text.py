"""Escaping raw control characters inside a JSON answer's strings, for both engines (see ``JsonText``)."""

from __future__ import annotations


class JsonText:
    """A JSON answer's text with the raw control characters inside its strings escaped. vLLM's structured outputs
    (xgrammar 0.2.8) let a string take tokens that decode to U+0000-U+001F, which JSON forbids unescaped (seen on the
    demo's experts near a schema's maxLength): the character is kept, written as ``\\u00XX``, so the answer parses.
    ``feed`` takes the text whole or a stream's pieces in order."""

    def __init__(self) -> None:
        self._in_string = False
        self._escaped = False

    def feed(self, text: str) -> str:
        out = []
        for ch in text:
            if self._in_string:
                if self._escaped:
                    self._escaped = False
                elif ch == "\\":
                    self._escaped = True
                elif ch == '"':
                    self._in_string = False
                elif ch < " ":
                    out.append(f"\\u{ord(ch):04x}")
                    continue
            elif ch == '"':
                self._in_string = True
            out.append(ch)
        return "".join(out)
