"""Strict structuring of plain data (YAML, JSON, dicts sent to Ray workers) into frozen dataclasses.

Every file a user writes or sdf-ray reads back goes through :func:`convert`: training configs, Tune search
files, dataset manifests. It never stops at the first problem: every unknown key (with the closest known
key as a suggestion), wrong type, ``Literal`` choice and out-of-range value is collected, each named by its
dotted path (``debug.inject[0].site``), so that one error lists them all.

What a dataclass may declare (conventionally ``@dataclass(frozen=True, kw_only=True)``, a docstring under
each field):

- field types ``bool``, ``int``, ``float`` (an int is accepted), ``str``, ``Any``, ``Literal[...]``,
  ``X | None``, ``tuple[X, ...]``, ``tuple[X, Y]``, ``dict[str, X]`` and nested dataclasses;
- ``Annotated[T, rule, ...]``: a rule is any callable ``value -> message | None``, run once the value has
  the right type (:class:`Gt`, :class:`Ge`, :class:`Interval`, :class:`NonEmpty`, :class:`Rule`; aliases
  such as :data:`PositiveInt`). A value that breaks a rule is still kept, so ``validate`` sees it;
- ``field(metadata={STRUCTURE: fn})``: a field with a grammar of its own; ``fn(value, path, problems)``
  returns the converted value (or None after appending problems);
- a method ``validate(self) -> Iterable[tuple[str, str]]`` for problems that involve several fields, as
  ``(key relative to the instance, message)``. It runs once the instance is built. Fields that failed to
  convert hold their defaults by then, so it still runs and every problem is reported at once.

Use :func:`structure` for a whole file or a standalone section (``structure(ReconstructConfig, data)``
raises one ``ConfigError``), :func:`convert` to compose or to word the problems differently (``DataError``).
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Annotated, Any, Literal, TypeVar, Union

from sdf_ray.errors import ConfigError

T = TypeVar("T")
STRUCTURE = "structure"
"""``field(metadata={STRUCTURE: fn})``: convert this field with ``fn(value, path, problems)``."""
ProblemKind = Literal["unknown", "missing", "type", "value"]


class Problem(str):
    """One problem, as the line a user reads (`` `optim.lr`: must be > 0, got -1 ``).

    It also keeps its dotted ``path``, its bare ``message`` and its ``kind`` for a caller that words
    problems its own way (the dataset manifest names scenes, not list indices).
    """

    path: str
    message: str
    kind: ProblemKind

    def __new__(cls, path: str, message: str, kind: ProblemKind = "value") -> Problem:
        self = super().__new__(cls, f"`{path}`: {message}" if path else message)
        self.path, self.message, self.kind = path, message, kind
        return self

    def __reduce__(self) -> tuple[type[Problem], tuple[str, str, ProblemKind]]:
        return Problem, (self.path, self.message, self.kind)  # a ConfigError crosses process boundaries


# ---------------------------------------------------------------------------------------------
# Rules for Annotated fields


@dataclass(frozen=True)
class Gt:
    bound: float

    def __call__(self, value: Any) -> str | None:
        return None if value > self.bound else f"must be > {self.bound}, got {value!r}"


@dataclass(frozen=True)
class Ge:
    bound: float

    def __call__(self, value: Any) -> str | None:
        return None if value >= self.bound else f"must be >= {self.bound}, got {value!r}"


@dataclass(frozen=True)
class Interval:
    """``lo < value`` or ``lo <= value`` (``closed[0]`` is ``(`` or ``[``), and likewise at ``hi``."""

    lo: float
    hi: float
    closed: Literal["[]", "[)", "(]", "()"] = "[]"

    def __call__(self, value: Any) -> str | None:
        above = value >= self.lo if self.closed[0] == "[" else value > self.lo
        below = value <= self.hi if self.closed[1] == "]" else value < self.hi
        if above and below:
            return None
        return f"must be in {self.closed[0]}{self.lo}, {self.hi}{self.closed[1]}, got {value!r}"


@dataclass(frozen=True)
class Rule:
    """Any other rule: ``test(value)`` must hold, else ``"<message>, got <value>"``."""

    test: Callable[[Any], bool]
    message: str

    def __call__(self, value: Any) -> str | None:
        return None if self.test(value) else f"{self.message}, got {value!r}"


@dataclass(frozen=True)
class NonEmpty:
    message: str = "must not be empty"

    def __call__(self, value: Any) -> str | None:
        return None if value else self.message


PositiveInt = Annotated[int, Gt(0)]
NonNegativeInt = Annotated[int, Ge(0)]
PositiveFloat = Annotated[float, Gt(0)]
NonNegativeFloat = Annotated[float, Ge(0)]


# ---------------------------------------------------------------------------------------------
# Conversion


def did_you_mean(word: str, options: Iterable[str], prefix: str = "") -> str:
    """``", did you mean `<prefix><closest>`?"`` or ``""`` when nothing is close."""
    close = difflib.get_close_matches(word, list(options), n=1)
    return f", did you mean `{prefix}{close[0]}`?" if close else ""


def convert(tp: Any, value: Any, problems: list[str], path: str = "", *, suggest_full_path: bool = True) -> Any:
    """``value`` as type ``tp``; on failure appends problems naming ``path`` and returns None.

    ``suggest_full_path``: an unknown key's suggestion is the full dotted path (``guard.grad_clip``, what
    ``--set`` takes); False suggests the bare key (``grad_clip``).
    """
    return _Structurer(problems, suggest_full_path).convert(value, tp, path)


def structure(cls: type[T], data: Any, *, source: str | None = None) -> T:
    """Build ``cls`` from plain data; one ConfigError (naming ``source``) listing every problem."""
    problems: list[str] = []
    obj = convert(cls, data, problems)
    if problems or obj is None:
        raise ConfigError(problems or ["invalid data"], source=source)
    return typing.cast(T, obj)


def is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if tp is type(None):
        return "null"
    if origin is Annotated:
        return type_name(typing.get_args(tp)[0])
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(type_name(a) for a in typing.get_args(tp))
    if origin is tuple:
        return "list"
    if origin is dict or is_dataclass_type(tp):
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def _join(path: str, key: str) -> str:
    if not path or not key:
        return path or key
    return f"{path}{key}" if key.startswith("[") else f"{path}.{key}"


def _got(value: Any) -> str:
    return f"{type(value).__name__} {value!r}"


class _Structurer:
    def __init__(self, problems: list[str], suggest_full_path: bool) -> None:
        self.problems = problems
        self.suggest_full_path = suggest_full_path

    def fail(self, path: str, message: str, kind: ProblemKind = "type") -> None:
        self.problems.append(Problem(path, message, kind))

    def convert(self, value: Any, tp: Any, path: str) -> Any:
        origin = typing.get_origin(tp)
        if tp is Any:
            return value
        if origin is Annotated:
            inner, *rules = typing.get_args(tp)
            before = len(self.problems)
            converted = self.convert(value, inner, path)
            if len(self.problems) == before:
                for rule in rules:
                    message = rule(converted)
                    if message:
                        self.fail(path, message, "value")
            return converted
        if origin in (Union, types.UnionType):
            args = typing.get_args(tp)
            if value is None and type(None) in args:
                return None
            non_none = [a for a in args if a is not type(None)]
            if len(non_none) == 1:
                return self.convert(value, non_none[0], path)
            raise AssertionError(f"unsupported union {tp!r} at {path}")  # pragma: no cover - our bug
        if origin is Literal:
            if value in typing.get_args(tp):
                return value
            self.fail(path, f"expected one of {type_name(tp)}, got {value!r}")
            return None
        if origin is tuple:
            return self._tuple(value, typing.get_args(tp), path)
        if origin is dict:
            return self._dict(value, typing.get_args(tp)[1], path)
        if is_dataclass_type(tp):
            return self._dataclass(tp, value, path)
        if tp is bool:
            if isinstance(value, bool):
                return value
        elif tp is int:
            if isinstance(value, int) and not isinstance(value, bool):
                return value
        elif tp is float:
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return float(value)
        elif tp is str:
            if isinstance(value, str):
                return value
        else:  # pragma: no cover - a field type this structurer does not know is our bug
            raise AssertionError(f"unsupported field type {tp!r} at {path}")
        self.fail(path, f"expected {type_name(tp)}, got {_got(value)}")
        return None

    def _tuple(self, value: Any, args: tuple[Any, ...], path: str) -> tuple[Any, ...] | None:
        if not isinstance(value, (list, tuple)):
            self.fail(path, f"expected a list, got {_got(value)}")
            return None
        if len(args) == 2 and args[1] is Ellipsis:
            item_types = [args[0]] * len(value)
        elif len(value) != len(args):
            self.fail(path, f"expected a list of {len(args)} items, got {len(value)}")
            return None
        else:
            item_types = list(args)
        before = len(self.problems)
        items = [self.convert(v, t, f"{path}[{i}]") for i, (v, t) in enumerate(zip(value, item_types))]
        return tuple(items) if len(self.problems) == before else None

    def _dict(self, value: Any, value_type: Any, path: str) -> dict[str, Any] | None:
        if not isinstance(value, dict):
            self.fail(path, f"expected a mapping, got {_got(value)}")
            return None
        before = len(self.problems)
        out: dict[str, Any] = {}
        for key, item in value.items():
            if not isinstance(key, str):
                self.fail(path, f"keys must be strings, got {key!r}")
                continue
            out[key] = self.convert(item, value_type, _join(path, key))
        return out if len(self.problems) == before else None

    def _dataclass(self, cls: Any, data: Any, path: str) -> Any:
        if data is None:
            data = {}
        if not isinstance(data, dict):
            if path:
                self.fail(path, f"expected a mapping, got {_got(data)}")
            else:
                self.fail(path, f"top level must be a mapping, got {_got(data)}")
            return None
        hints = typing.get_type_hints(cls, include_extras=True)
        fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
        kwargs: dict[str, Any] = {}
        for key, value in data.items():
            dotted = _join(path, str(key))
            f = fields.get(key) if isinstance(key, str) else None
            if f is None:
                prefix = f"{path}." if path and self.suggest_full_path else ""
                self.fail(dotted, f"unknown key{did_you_mean(str(key), fields, prefix)}", "unknown")
                continue
            before = len(self.problems)
            custom = f.metadata.get(STRUCTURE)
            converted = custom(value, dotted, self.problems) if custom else self.convert(value, hints[key], dotted)
            # Keep what converted (a section with one bad field keeps its good ones); a value that did not
            # convert leaves the default in place so that the remaining checks still run.
            if len(self.problems) == before or converted is not None:
                kwargs[key] = converted
        required = [name for name, f in fields.items()
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        for name in required:
            if name not in data:
                self.fail(_join(path, name), "required key is missing", "missing")
        if any(name not in kwargs for name in required):
            return None  # its problems are reported already
        obj = cls(**kwargs)
        validate = getattr(obj, "validate", None)
        if callable(validate):
            for key, message in validate():
                self.fail(_join(path, key), message, "value")
        return obj
