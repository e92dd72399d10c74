"""Which compositions fit their router in a background `fit` job (minutes: training, or a model writing)
rather than in the request that created them (seconds)."""

from __future__ import annotations

import pytest

from composition.mixtures import fit_is_slow


@pytest.mark.parametrize(
    ("router", "params", "slow"),
    [
        ("embedding", {}, False),
        ("arrow", {}, False),  # power iteration over each adapter: seconds
        ("phatgoose", {}, True),  # trains a gate per module per expert
        ("mixer", {"examples": [{"prompt": "p", "answer": "a"}]}, True),  # trains the router
        ("glider", {"local": "arrow", "model": "base"}, False),  # its global part embeds descriptions: quick
        ("glider", {"local": "phatgoose", "model": "base"}, True),  # its local router trains gates
        ("kshot", {"examples": [{"prompt": "p", "answer": "a"}]}, True),  # runs every expert on the examples
    ],
)
def test_fit_is_slow(router: str, params: dict[str, object], slow: bool) -> None:
    assert fit_is_slow(router, params) is slow
