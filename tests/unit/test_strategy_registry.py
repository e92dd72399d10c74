"""The one strategy registry (core/strategies.py) on its own: validated registration, building from a user's
parameters, the help listing; and that the four strategy kinds use it."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import msgspec
import pytest

from core.errors import ValidationFailed
from core.strategies import Registry, StrategyClass, StrategyConfig, field_help


def require(condition: bool, field: str, reason: str) -> None:
    if not condition:
        raise ValidationFailed(f"widget_params.{field}: {reason}", param=f"widget_params.{field}")


class Inner(StrategyConfig, frozen=True):
    """How deep.

    depth: levels below the top (0..3),
        counted from 0.
    """

    depth: int = 1


class WidgetConfig(StrategyConfig, frozen=True):
    """Parameters of a widget.

    size: how big (1..10).
    shape: "round" or "square".
    label: printed on it (None: nothing).
    inner: how it nests.
    """

    size: int = 2
    shape: Literal["round", "square"] = "round"
    label: str | None = None
    inner: Inner = msgspec.field(default_factory=Inner)

    def check(self) -> None:
        require(1 <= self.size <= 10, "size", "must lie between 1 and 10")
        require(0 <= self.inner.depth <= 3, "inner.depth", "must lie between 0 and 3")


class BigWidgetConfig(WidgetConfig, frozen=True):
    size: int = 9  # a new default; the help comes from WidgetConfig's docstring


class Widget:
    name: ClassVar[str]
    config_cls: ClassVar[type[StrategyConfig]]
    help: ClassVar[str]

    def __init__(self, config: StrategyConfig, owner: str = "") -> None:
        self.config = config
        self.owner = owner


def widget(name: str, config_cls: Any = WidgetConfig, help: Any = "makes widgets") -> type[Widget]:
    return type(f"W_{name}", (Widget,), {"name": name, "config_cls": config_cls, "help": help})


def registry() -> Registry[StrategyClass[Widget], WidgetConfig]:
    return Registry("widget", config_base=WidgetConfig, params_field="widget_params", param="widget")


def test_register_reads_the_class_and_returns_it() -> None:
    widgets = registry()
    cls = widget("round_one")
    assert widgets.register(cls) is cls  # usable as a class decorator
    entry = widgets.get("round_one")
    assert (entry.name, entry.cls, entry.config_cls, entry.help) == ("round_one", cls, WidgetConfig, "makes widgets")
    assert "round_one" in widgets and "other" not in widgets and widgets.names() == ["round_one"]


def test_refuses_a_duplicate_name() -> None:
    widgets = registry()
    first = widget("twice")
    widgets.register(first)
    with pytest.raises(ValueError, match="registered twice"):
        widgets.register(widget("twice"))
    assert widgets.get("twice").cls is first


@pytest.mark.parametrize("name", ["", "Round", "2d", "a-b", "_hidden", "with space", "é", "a\n", None, 3])
def test_refuses_a_bad_name(name: object) -> None:
    widgets = registry()
    with pytest.raises(ValueError, match="lower-case identifier"):
        widgets.register(widget(name))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="lower-case identifier"):
        widgets.register(Widget)  # declares no name at all
    assert widgets.names() == []


def test_refuses_a_class_without_a_config_or_help() -> None:
    widgets = registry()
    no_config = type("NoConfig", (Widget,), {"name": "no_config", "help": "h"})
    cases: list[tuple[type[Widget], str]] = [
        (no_config, "must subclass WidgetConfig"),
        (widget("plain_struct", config_cls=msgspec.Struct), "must subclass WidgetConfig"),
        (widget("other_config", config_cls=Inner), "must subclass WidgetConfig"),  # a StrategyConfig, wrong kind
        (widget("not_a_class", config_cls=WidgetConfig()), "must subclass WidgetConfig"),
        (widget("no_help", help=""), "one-line help"),
        (widget("blank_help", help="   "), "one-line help"),
        (widget("two_lines", help="first\nsecond"), "one-line help"),
    ]
    for cls, message in cases:
        with pytest.raises(ValueError, match=message):
            widgets.register(cls)
    assert widgets.names() == []


def test_refuses_a_config_with_an_undocumented_parameter() -> None:
    class Undocumented(WidgetConfig, frozen=True):
        """Parameters.

        speed: how fast.
        """

        speed: int = 1
        colour: str = "red"

    widgets = registry()
    with pytest.raises(ValueError, match=r"without help: colour \(document each in the docstring of Undocumented"):
        widgets.register(widget("undocumented", config_cls=Undocumented))
    assert widgets.names() == []
    widgets.register(widget("big", config_cls=BigWidgetConfig))  # inherits its fields' help
    assert widgets.names() == ["big"]


def test_build_validates_params_into_the_typed_config() -> None:
    widgets = registry()
    widgets.register(widget("round_one"))
    built = widgets.build("round_one", {"size": 5, "inner": {"depth": 0}}, "alice")
    assert isinstance(built, Widget) and built.owner == "alice"
    assert built.config == WidgetConfig(size=5, inner=Inner(depth=0))
    assert widgets.build("round_one").config == WidgetConfig()  # no params: every default
    assert widgets.config("round_one", {"size": 3}).digest() == WidgetConfig(size=3).digest()


@pytest.mark.parametrize(
    ("params", "param"),
    [
        ({"size": "big"}, "widget_params.size"),  # wrong type
        ({"size": 11}, "widget_params.size"),  # out of range (check)
        ({"colour": "red"}, "widget_params.colour"),  # unknown
        ({"shape": "oval"}, "widget_params.shape"),
        ({"inner": {"depth": "deep"}}, "widget_params.inner.depth"),
        ({"inner": {"depth": 7}}, "widget_params.inner.depth"),
        ({"inner": {"width": 1}}, "widget_params.inner.width"),
        ([1, 2], "widget_params"),  # not an object at all
    ],
)
def test_build_names_the_bad_param(params: Any, param: str) -> None:
    widgets = registry()
    widgets.register(widget("round_one"))
    with pytest.raises(ValidationFailed) as info:
        widgets.build("round_one", params)
    assert info.value.param == param
    assert info.value.message.startswith("widget_params")
    assert info.value.status_code == 400


def test_an_unknown_name_names_the_field_and_the_known_ones() -> None:
    widgets = registry()
    widgets.register(widget("round_one"))
    widgets.register(widget("another"))
    for name in ("nope", None, ["round_one"]):
        with pytest.raises(ValidationFailed) as info:
            widgets.get(name)  # type: ignore[arg-type]
        assert info.value.param == "widget"
        assert info.value.message == f"unknown widget {name!r}; known: another, round_one"


def test_describe_lists_each_strategy_and_its_parameters_help() -> None:
    widgets = registry()
    widgets.register(widget("square_one", help="makes square widgets"))
    widgets.register(widget("big", config_cls=BigWidgetConfig))
    listing = widgets.describe()
    assert [(s.name, s.help) for s in listing] == [("big", "makes widgets"), ("square_one", "makes square widgets")]
    params = {p.name: p for p in listing[0].params}
    assert list(params) == ["size", "shape", "label", "inner", "inner.depth"]
    assert (params["size"].type, params["size"].default, params["size"].help) == ("int", 9, "how big (1..10).")
    assert params["shape"].type == "'round' | 'square'" and params["shape"].help == '"round" or "square".'
    assert params["label"].type == "str | null" and params["label"].default is None
    assert params["inner"].type == "Inner" and params["inner"].default == {"depth": 1}
    assert params["inner.depth"].help == "levels below the top (0..3), counted from 0."
    assert not any(p.required for p in params.values())
    assert msgspec.json.decode(msgspec.json.encode(listing))[0]["params"][0]["name"] == "size"  # JSON-able


def test_field_help_reads_docstrings_along_the_bases() -> None:
    assert field_help(BigWidgetConfig)["size"] == "how big (1..10)."
    assert field_help(Inner) == {"depth": "levels below the top (0..3), counted from 0."}


def test_a_record_is_its_own_entry() -> None:
    """Strategies that are not classes (merge methods) register a record carrying name, help and config_cls."""

    @dataclass(frozen=True)
    class Recipe:
        name: str
        help: str
        config_cls: type[WidgetConfig]
        extra: int = 0

    recipes: Registry[Recipe, WidgetConfig] = Registry(
        "recipe", config_base=WidgetConfig, params_field="widget_params", param="r"
    )
    recipe = Recipe("stew", "a stew", WidgetConfig, extra=4)
    assert recipes.register(recipe) is recipe
    assert recipes.get("stew") is recipe and list(recipes) == [recipe]
    assert recipes.config("stew", {"size": 4}) == WidgetConfig(size=4)
    with pytest.raises(ValueError, match="registered twice"):
        recipes.register(Recipe("stew", "again", WidgetConfig))
    with pytest.raises(ValueError, match="must subclass WidgetConfig"):
        recipes.register(Recipe("soup", "a soup", Inner))  # type: ignore[arg-type]


def test_the_four_strategy_kinds_use_it() -> None:
    from aggregators import AGGREGATORS
    from merging.methods import METHODS
    from routers.query import ROUTERS
    from routers.token import TOKEN_ROUTERS

    for strategies, kind, param in [
        (ROUTERS, "router", "router"),
        (TOKEN_ROUTERS, "token router", "router"),
        (AGGREGATORS, "aggregator", "aggregator"),
        (METHODS, "merge method", "method"),
    ]:
        assert isinstance(strategies, Registry)
        assert strategies.kind == kind and strategies.param == param
        listing = strategies.describe()
        assert [s.name for s in listing] == strategies.names() and listing
        assert all(p.help for s in listing for p in s.params)  # every parameter of every strategy has help
    assert any(p.name == "inputs[i].density" for p in next(s for s in METHODS.describe() if s.name == "ties").params)


def test_core_imports_nothing_of_moerge() -> None:
    code = (
        "import sys, core.errors, core.schemas, core.strategies;"
        "print(sorted({m.split('.')[0] for m in sys.modules} & set(sys.argv[1:])))"
    )
    above = ["registry", "routers", "aggregators", "merging", "serving", "composition", "api", "evals", "bench"]
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", code, *above], cwd=root, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_integrity_failure_is_gone() -> None:
    import core.errors

    assert not hasattr(core.errors, "IntegrityFailure")  # dead code, dropped
