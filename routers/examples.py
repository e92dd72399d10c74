"""Named sources of training examples that a router's config may name instead of listing the examples
(``mixer``'s ``task``).

The product holds no example data of its own: whoever starts it installs the sources. api installs the demo's
tasks (``evals.sources.install_example_sources``: each evals task's train split) where the app and the CLI
start, so routers never import evals.
"""

from __future__ import annotations

from collections.abc import Callable

from registry.training_data import TrainingRow

ExampleSource = Callable[[int], list[TrainingRow]]
"""``n`` -> the source's first ``n`` examples, the same ones on every call (a trained router state is keyed by
them)."""

_SOURCES: dict[str, ExampleSource] = {}


def register_example_source(name: str, source: ExampleSource) -> None:
    """Make ``source`` answer to ``name``; registering a name again replaces its source (installing twice is
    harmless)."""
    if not name:
        raise ValueError("an example source needs a name")
    _SOURCES[name] = source


def example_source_names() -> list[str]:
    """The registered names, in the order they were first registered."""
    return list(_SOURCES)


def example_rows(name: str, n: int) -> list[TrainingRow]:
    """The first ``n`` examples of the source ``name`` (KeyError when no source has that name)."""
    return _SOURCES[name](n)
