"""The machinery under :mod:`moleflow.config`: the pydantic base of every config section, the value
types, and the translation of pydantic's errors into one-line :class:`ConfigError` messages.

Nothing here knows the method's sections; :mod:`moleflow.config` declares them. A new section is a
:class:`Section` subclass with typed, range-constrained fields (``Field(ge=1)``) plus one field on its
parent; loading, ``--set`` overrides, error messages and the JSON schema pick it up with no other code.

Error messages name the dotted key, what is allowed, and the value given, one line per problem::

    train.epochs: must be >= 1, got 0
    router.metric: must be one of 'mahalanobis', 'euclidean', got 'cosine'
    train.lrr: unknown key, did you mean 'lr'? (`moleflow config PRESET` prints every key)
"""

from __future__ import annotations

import copy
import difflib
import json
import re
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any

import yaml
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError
from pydantic_core import PydanticCustomError

__all__ = [
    "KEYS_HINT",
    "ConfigError",
    "ConfigProblem",
    "Decay",
    "Fraction",
    "Kernel",
    "NonNegative",
    "Number",
    "Positive",
    "UnitInterval",
    "Section",
    "StrictInt",
    "config_error",
    "deep_merge",
    "json_schema_text",
    "parse_override",
    "replace",
    "section_class",
    "set_dotted",
    "to_dict",
]

KEYS_HINT = "`moleflow config PRESET` prints every key"


@dataclass(frozen=True)
class ConfigProblem:
    """One wrong value: ``key`` is dotted (``train.epochs``), ``message`` says what is allowed."""

    key: str
    message: str
    value: Any = None
    has_value: bool = True

    def __str__(self) -> str:
        got = f", got {self.value!r}" if self.has_value else ""
        return f"{self.key}: {self.message}{got}" if self.key else f"{self.message}{got}"


class ConfigError(ValueError):
    """A configuration value, key or file is wrong; one line per problem, each naming the key.

    ``problems`` holds the individual :class:`ConfigProblem` records (empty for file-level errors).
    """

    def __init__(self, message: str, problems: Iterable[ConfigProblem] = ()) -> None:
        super().__init__(message)
        self.problems: tuple[ConfigProblem, ...] = tuple(problems)


# ----------------------------------------------------------------------------- value types


def _number(value: Any) -> Any:
    """Accept ints, floats and numeric strings (YAML 1.1 reads ``1e-3`` as a string); refuse booleans."""
    if isinstance(value, bool):
        raise PydanticCustomError("number", "must be a number")
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            raise PydanticCustomError("number", "must be a number") from None
    return value


# Float fields: ints and numeric strings are converted, booleans refused, NaN/inf refused (Section config).
# The bounds sit next to ``float`` (before the validator) so the JSON schema gets its standard keywords.
Number = Annotated[float, BeforeValidator(_number)]
Positive = Annotated[float, Field(gt=0.0), BeforeValidator(_number)]
NonNegative = Annotated[float, Field(ge=0.0), BeforeValidator(_number)]
Fraction = Annotated[float, Field(gt=0.0, le=1.0), BeforeValidator(_number)]  # (0, 1]
UnitInterval = Annotated[float, Field(ge=0.0, le=1.0), BeforeValidator(_number)]  # [0, 1]
Decay = Annotated[float, Field(ge=0.0, lt=1.0), BeforeValidator(_number)]  # [0, 1): Adam's betas


def _odd(value: int) -> int:
    if value % 2 == 0:
        raise PydanticCustomError("odd", "must be odd (the convolution keeps the grid size)")
    return value


StrictInt = Annotated[int, Field(strict=True)]  # no booleans, no "3" strings, no 3.0
#: Convolution kernel sizes: odd, so that ``padding = k // 2`` keeps the patch grid's size.
Kernel = Annotated[int, Field(strict=True, ge=1, json_schema_extra={"not": {"multipleOf": 2}}), AfterValidator(_odd)]


# ----------------------------------------------------------------------------- the section base


class _SectionMeta(type(BaseModel)):
    """Turns the ValidationError of a direct construction (``TrainConfig(epochs=0)``) into a ConfigError.

    A metaclass and not ``__init__``: pydantic calls a custom ``__init__`` for nested sections too, and
    the parent would then wrap our message in its own.
    """

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().__call__(*args, **kwargs)
        except ValidationError as e:
            raise config_error(e, cls) from None


class Section(BaseModel, metaclass=_SectionMeta):
    """Base of every config section: unknown keys refused, assignments validated, NaN/inf refused.

    Constructing or assigning a bad value raises :class:`ConfigError` (keys relative to this section).
    """

    model_config = ConfigDict(
        extra="forbid",
        validate_assignment=True,
        allow_inf_nan=False,
        use_attribute_docstrings=True,
        validate_default=True,
    )

    def __setattr__(self, name: str, value: Any) -> None:
        try:
            super().__setattr__(name, value)
        except ValidationError as e:
            raise config_error(e, type(self)) from None

    @classmethod
    def parse(cls, data: Mapping[str, Any], prefix: str = ""):  # noqa: ANN206 (returns cls)
        """Validate a plain mapping; ConfigError lists every problem (``prefix`` starts each line)."""
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            raise config_error(e, cls, prefix) from None


def section_class(annotation: Any) -> type[Section] | None:
    """The Section class of a field annotated ``X`` or ``X | None``; None for value fields."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        annotation = args[0] if len(args) == 1 else None
    return annotation if isinstance(annotation, type) and issubclass(annotation, Section) else None


def _section_at(root: type[Section], loc: tuple[Any, ...]) -> type[Section] | None:
    cls: type[Section] | None = root
    for part in loc:
        if cls is None or part not in cls.model_fields:
            return None
        cls = section_class(cls.model_fields[part].annotation)
    return cls


# ----------------------------------------------------------------------------- error translation

_TYPE_MESSAGES = {
    "int_type": "must be an integer",
    "int_from_float": "must be an integer",
    "float_type": "must be a number",
    "float_parsing": "must be a number",
    "finite_number": "must be a finite number",
    "bool_type": "must be true or false",
    "string_type": "must be a string",
    "tuple_type": "must be a list",
    "list_type": "must be a list",
    "dict_type": "must be a mapping",
    "model_type": "must be a mapping of keys (a section)",
    "model_attributes_type": "must be a mapping of keys (a section)",
}


def _dotted(loc: Iterable[Any]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _message(err: Mapping[str, Any], root: type[Section], loc: tuple[Any, ...]) -> tuple[str, bool]:
    """(what is allowed, whether to print the value) for one pydantic error dict."""
    kind, ctx = err["type"], err.get("ctx") or {}
    if kind == "extra_forbidden":
        parent = _section_at(root, loc[:-1])
        known = list(parent.model_fields) if parent else []
        close = difflib.get_close_matches(str(loc[-1]), known, n=1)
        guess = f", did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(known)}."
        return f"unknown key{guess} ({KEYS_HINT})", False
    if err.get("input") is None and kind != "missing":
        return "may not be null (only optional sections can be switched off with null)", False
    bounds = {
        "greater_than": ">",
        "greater_than_equal": ">=",
        "less_than": "<",
        "less_than_equal": "<=",
    }
    if kind in bounds:
        limit = next(iter(ctx.values()))
        return f"must be {bounds[kind]} {limit}", True
    if kind == "multiple_of":
        return f"must be a multiple of {ctx['multiple_of']}", True
    if kind == "literal_error":
        expected = str(ctx["expected"])
        return (f"must be one of {expected.replace(' or ', ', ')}" if " or " in expected else f"must be {expected}"), True
    if kind == "missing" and loc and isinstance(loc[-1], int):
        return f"entry [{loc[-1]}] is missing", True
    if kind == "too_short":
        return f"must have at least {ctx['min_length']} entries", True
    if kind == "too_long":
        return f"must have at most {ctx['max_length']} entries", True
    if kind in _TYPE_MESSAGES:
        return _TYPE_MESSAGES[kind], True
    msg = str(err["msg"]).removeprefix("Value error, ")
    return msg, True


def config_error(exc: ValidationError, root: type[Section], prefix: str = "") -> ConfigError:
    """Translate a pydantic ValidationError on ``root`` into a ConfigError, one line per problem.

    Custom validators may put ``field`` in their error context to name a key below the failing section.
    """
    problems: list[ConfigProblem] = []
    for err in exc.errors(include_url=False):
        loc = tuple(err["loc"])
        message, show_value = _message(err, root, loc)
        if err["type"] == "missing" and loc and isinstance(loc[-1], int):
            loc = loc[:-1]
        if "field" in (err.get("ctx") or {}):  # a check across fields, raised by the section holding them
            loc, show_value = (*loc, err["ctx"]["field"]), False
        problem = ConfigProblem(_dotted(loc), message, err.get("input"), show_value)
        if problem not in problems:
            problems.append(problem)
    lead = f"{prefix}: " if prefix else ""
    return ConfigError("\n".join(lead + str(p) for p in problems), problems)


# ----------------------------------------------------------------------------- plain-dict helpers


def deep_merge(base: Mapping[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``update`` laid over it, key by key; a mapping over a null section fills that section."""
    out = copy.deepcopy(dict(base))
    for k, v in update.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def set_dotted(data: dict[str, Any], root: type[Section], key: str, value: Any) -> None:
    """Set ``data[a][b][c] = value`` for ``key = "a.b.c"`` in a plain dump of a ``root`` config.

    A null section on the way (``model.dia`` switched off) is switched on with its class defaults first.
    Unknown keys raise ConfigError naming the key, the closest known key and where to list them.
    """
    parts = key.strip().split(".")
    node: Any = data
    cls: type[Section] | None = root
    for depth, part in enumerate(parts):
        where = ".".join(parts[: depth + 1])
        last = depth == len(parts) - 1
        fields = list(cls.model_fields) if cls is not None else list(node) if isinstance(node, dict) else []
        if part not in fields:
            close = difflib.get_close_matches(part, fields, n=1)
            guess = f", did you mean {close[0]!r}?" if close else f"; known: {', '.join(fields)}"
            raise ConfigError(f"{where}: unknown key{guess} ({KEYS_HINT})", [ConfigProblem(where, "unknown key")])
        if last:
            node[part] = value
            return
        child = section_class(cls.model_fields[part].annotation) if cls is not None else None
        if node.get(part) is None and child is not None:
            node[part] = child().model_dump(mode="json")
        if not isinstance(node.get(part), dict):
            raise ConfigError(f"{where}: is a value, not a section; set it as {where}=VALUE")
        node, cls = node[part], child


def to_dict(cfg: BaseModel) -> dict[str, Any]:
    """Plain nested dict with tuples as lists (YAML- and JSON-safe), keys in declaration order."""
    if not isinstance(cfg, BaseModel):
        raise TypeError(f"to_dict expects a config section, got {type(cfg).__name__}")
    return cfg.model_dump(mode="json")


S = typing.TypeVar("S", bound=Section)


def replace(section: S, **changes: Any) -> S:
    """A validated copy of ``section`` with ``changes`` (the config counterpart of ``dataclasses.replace``)."""
    try:
        return type(section).model_validate({**dict(section), **changes})
    except ValidationError as e:
        raise config_error(e, type(section)) from None


class YamlLoader(yaml.SafeLoader):
    """PyYAML's safe loader, reading ``1e-3`` / ``-5E+2`` as floats as YAML 1.2 does (YAML 1.1 wants a dot:
    ``1e-3`` would be the string ``"1e-3"``, and ``--set train.lr=1e-3`` would fail validation)."""


YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def load_yaml(text: str) -> Any:
    """``text`` parsed as YAML with :class:`YamlLoader` (config files and ``--set`` values alike)."""
    return yaml.load(text, Loader=YamlLoader)  # noqa: S506 - a SafeLoader subclass


def parse_override(item: str) -> tuple[str, Any]:
    """``"train.lr=1e-3"`` -> ``("train.lr", 0.001)``: the value is read as YAML (``null``, ``[1, 2]``)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key.sub=value")
    key, raw = item.split("=", 1)
    try:
        return key, (load_yaml(raw) if raw.strip() else None)
    except yaml.YAMLError as e:
        raise ConfigError(f"override {item!r}: the value is not valid YAML ({e})") from e


def json_schema_text(root: type[Section]) -> str:
    """The JSON schema (draft 2020-12) of a ``root`` config file, pretty-printed, newline-terminated."""
    schema = {"$schema": "https://json-schema.org/draft/2020-12/schema", **root.model_json_schema()}
    return json.dumps(schema, indent=2) + "\n"
