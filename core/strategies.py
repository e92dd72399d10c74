"""One registry for every kind of pluggable strategy: query routers, token routers, aggregators, merge methods.

A strategy has a name users write (in a composition, a merge request), a one-line help text and typed
parameters: a ``StrategyConfig`` (a msgspec Struct) that documents every field in its docstring, one line
``<field>: <help>`` each (continued on more-indented lines), so ``Registry.describe`` can list them. Help is
looked up along the class's bases, so a subclass that only changes a default keeps its base's help.
``Registry.config`` turns a user's plain dict into that config and checks its ranges; errors name
``<params_field>.<param>`` (``router_params.top_k``). Registration is validated once, at import: a mistake
there is the programmer's (ValueError), not the user's.

A strategy that is a class (routers, aggregators) is registered by decorating it with ``@REGISTRY.register``
(its ClassVars ``name``, ``help`` and ``config_cls`` are read into a ``StrategyClass`` entry) and built as
``cls(config, *args)``. A strategy that is a record describing itself (a merge method) is its own entry.
"""

from __future__ import annotations

import hashlib
import inspect
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar, overload

import msgspec
import msgspec.inspect as mi

from core.errors import ValidationFailed
from core.schemas import convert_params

NAME_RE = re.compile(r"[a-z][a-z0-9_]*")
NAME_RULE = "a lower-case identifier (a letter, then letters, digits or '_')"
_HELP_RE = re.compile(r"(?:``)?(\w+)(?:``)?: (\S.*)")  # a docstring line documenting one field: `name: help`


class StrategyConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    """A strategy's parameters: subclasses add fields, each with a default and a docstring line."""

    def check(self) -> None:
        """Raise ValidationFailed(param="<params_field>.<field>") when a value is out of range."""

    def digest(self) -> str:
        """A hash of the values: fitted states and merges are stored under it (same config, same hash)."""
        return hashlib.sha256(msgspec.json.encode(self, order="sorted")).hexdigest()[:16]


class Strategy(Protocol):
    """What the registry reads of an entry."""

    @property
    def name(self) -> str: ...

    @property
    def help(self) -> str: ...

    @property
    def config_cls(self) -> type[StrategyConfig]: ...


T = TypeVar("T")
E = TypeVar("E", bound=Strategy)
C = TypeVar("C", bound=StrategyConfig)


@dataclass(frozen=True)
class StrategyClass(Generic[T]):
    """The entry of a strategy that is a class; ``Registry.build`` makes ``cls(config, *args)``."""

    name: str
    cls: type[T]
    config_cls: type[StrategyConfig]
    help: str


class ParamHelp(msgspec.Struct, frozen=True):
    """One parameter as a user writes it: nested ones dotted (``training.steps``)."""

    name: str
    type: str  # JSON-like: int, float, bool, str, null, 'a' | 'b', list[...], a struct's class name
    default: Any  # JSON-able; None when the parameter is required
    required: bool
    help: str


class StrategyHelp(msgspec.Struct, frozen=True):
    name: str
    help: str
    params: tuple[ParamHelp, ...]


class Registry(Generic[E, C]):
    """Name -> strategy entry (``E``), filled by one validated ``register`` call per strategy; ``C`` is the
    base of their configs (what ``config`` returns).

    ``kind`` names the strategy in messages ("router"); ``config_base`` is the class every config must
    subclass; ``params_field`` is the request field the parameters come in ("router_params"), which errors
    about a parameter name; ``param`` is the request field the strategy's name comes in ("router"), which
    an unknown name's error names. Subclasses may add checks (``check_entry``) and parameters (``params``).
    """

    def __init__(self, kind: str, *, config_base: type[C], params_field: str, param: str) -> None:
        if not (isinstance(config_base, type) and issubclass(config_base, StrategyConfig)):
            raise ValueError(f"{kind}: config_base must subclass StrategyConfig")
        self.kind = kind
        self.config_base = config_base
        self.params_field = params_field
        self.param = param
        self._entries: dict[str, E] = {}

    @overload
    def register(self: Registry[StrategyClass[T], C], strategy: type[T]) -> type[T]: ...

    @overload
    def register(self, strategy: E) -> E: ...

    def register(self, strategy: Any) -> Any:
        """Validate and add one strategy (a class, or a record that is its own entry); returns it, so a
        class can be decorated. Mistakes are programming errors (ValueError) and add nothing."""
        if isinstance(strategy, type):
            label = strategy.__name__
            # its ClassVars, checked below like a record's attributes
            read: list[Any] = [getattr(strategy, attr, None) for attr in ("name", "help", "config_cls")]
            entry: Any = StrategyClass(name=read[0], cls=strategy, config_cls=read[2], help=read[1])
        else:
            label, entry = type(strategy).__name__, strategy
        name = getattr(entry, "name", None)
        if not isinstance(name, str) or not NAME_RE.fullmatch(name):
            raise ValueError(f"{label}: a {self.kind} name must be {NAME_RULE}, got {name!r}")
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is registered twice ({label})")
        text = getattr(entry, "help", None)
        if not isinstance(text, str) or not text.strip() or "\n" in text.strip():
            raise ValueError(f"{label}: give the {self.kind} {name!r} a one-line help text")
        config_cls = getattr(entry, "config_cls", None)
        if not (isinstance(config_cls, type) and issubclass(config_cls, self.config_base)):
            raise ValueError(f"{label}: config_cls of {self.kind} {name!r} must subclass {self.config_base.__name__}")
        self.check_entry(entry)
        undocumented = [p.name for p in self.params(entry) if not p.help.strip()]
        if undocumented:
            raise ValueError(
                f"{label}: parameters of {self.kind} {name!r} without help: {', '.join(undocumented)} "
                f"(document each in the docstring of {entry.config_cls.__name__}: a line '<field>: <help>')"
            )
        self._entries[name] = entry
        return strategy

    def check_entry(self, entry: E) -> None:
        """Checks a kind of strategy adds to the common ones; raise ValueError."""

    def params(self, entry: E) -> tuple[ParamHelp, ...]:
        """The parameters ``entry`` takes (its config's fields), for the listing and the help check."""
        return struct_params(entry.config_cls)

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[E]:
        return iter([self._entries[name] for name in self.names()])

    def get(self, name: str) -> E:
        entry = self._entries.get(name) if isinstance(name, str) else None
        if entry is None:
            raise ValidationFailed(f"unknown {self.kind} {name!r}; known: {', '.join(self.names())}", param=self.param)
        return entry

    def config(self, name: str, params: Any) -> C:
        """``params`` (a plain dict, as decoded from JSON or YAML; None: every default) as the typed,
        range-checked config of ``name``; errors name ``<params_field>.<param>``."""
        config: C = convert_params(  # a C: register checked that config_cls subclasses config_base
            {} if params is None else params, self.get(name).config_cls, self.params_field
        )
        config.check()
        return config

    def build(self: Registry[StrategyClass[T], C], name: str, params: Any = None, *args: Any) -> T:
        """The strategy ``name`` configured from ``params``: ``cls(config, *args)`` (e.g. a router's context)."""
        cls: Any = self.get(name).cls  # each kind's base class declares the constructor it calls
        built: T = cls(self.config(name, params), *args)
        return built

    def describe(self) -> list[StrategyHelp]:
        """Every strategy with its help and its parameters' (name, type, default, help), sorted by name."""
        return [StrategyHelp(entry.name, entry.help, self.params(entry)) for entry in self]


def struct_params(struct: type[msgspec.Struct], prefix: str = "") -> tuple[ParamHelp, ...]:
    """The fields of ``struct`` as parameters, with the fields of nested structs after theirs (dotted)."""
    info = mi.type_info(struct)
    if not isinstance(info, mi.StructType):
        raise ValueError(f"{struct!r} is not a msgspec Struct")
    return tuple(_fields(info, prefix))


def _fields(info: mi.StructType, prefix: str) -> Iterator[ParamHelp]:
    documented = field_help(info.cls)
    for field in info.fields:
        typ = field.type
        while isinstance(typ, mi.Metadata):  # Annotated[..., Meta(...)]: the type itself
            typ = typ.type
        default: Any = None
        if field.default is not msgspec.NODEFAULT:
            default = field.default
        elif field.default_factory is not msgspec.NODEFAULT:
            default = field.default_factory()
        name = f"{prefix}{field.encode_name}"
        text = documented.get(field.name) or documented.get(field.encode_name, "")
        yield ParamHelp(name, _type_name(typ), msgspec.to_builtins(default), field.required, text)
        if isinstance(typ, mi.StructType):
            yield from _fields(typ, f"{name}.")


def field_help(struct: type[msgspec.Struct]) -> dict[str, str]:
    """Field name -> help, from the ``<field>: <help>`` lines of the docstrings of ``struct`` and its bases
    (the nearest class wins)."""
    found: dict[str, str] = {}
    for klass in reversed(struct.__mro__):
        doc = klass.__dict__.get("__doc__")
        if klass is msgspec.Struct or not issubclass(klass, msgspec.Struct) or not doc:
            continue
        current: str | None = None
        for line in inspect.cleandoc(doc).splitlines():
            if entry := _HELP_RE.fullmatch(line):
                current = entry.group(1)
                found[current] = entry.group(2).strip()
            elif current and line[:1].isspace() and line.strip():
                found[current] += " " + line.strip()
            else:
                current = None
    return found


def _type_name(typ: mi.Type) -> str:
    """A parameter's type as JSON users would read it."""
    if isinstance(typ, mi.Metadata):
        return _type_name(typ.type)
    if isinstance(typ, mi.UnionType):
        return " | ".join(_type_name(t) for t in typ.types)
    if isinstance(typ, mi.LiteralType):
        return " | ".join(repr(v) for v in typ.values)
    if isinstance(typ, mi.EnumType):
        return " | ".join(repr(member.value) for member in typ.cls)
    if isinstance(typ, mi.StructType):
        return typ.cls.__name__
    if isinstance(typ, mi.NoneType):
        return "null"
    if isinstance(typ, mi.ListType | mi.VarTupleType | mi.SetType | mi.FrozenSetType):
        return f"list[{_type_name(typ.item_type)}]"
    if isinstance(typ, mi.DictType):
        return f"dict[{_type_name(typ.key_type)}, {_type_name(typ.value_type)}]"
    return type(typ).__name__.removesuffix("Type").lower() or "any"  # int, float, bool, str, any, ...
