"""Small helpers the browser tests share."""

from __future__ import annotations

from typing import Any


def tab_to(page: Any, selector: str, limit: int = 120) -> None:
    """Press Tab until the element matching ``selector`` has the focus (the keyboard's way to a field)."""
    for _ in range(limit):
        page.keyboard.press("Tab")
        if page.evaluate("s => document.activeElement !== null && document.activeElement.matches(s)", selector):
            return
    raise AssertionError(f"Tab never reached {selector}")
