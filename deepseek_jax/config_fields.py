"""Typed fields of frozen config dataclasses: validation by a table of rules, ``key=value``
overrides into nested dataclasses, and JSON values checked against the field types.

Generic over the dataclass (``config.py`` holds the classes and their rules), so a config
class is data plus a rules table, not a long ``__post_init__``.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal

# A rule: (field it names, check on the whole object, what it requires). The text is a
# ``str.format`` template over ``c``, the object, so a rule can quote the fields it relates.
Rule = tuple[str, Callable[[Any], bool], str]


def positive(*names: str) -> tuple[Rule, ...]:
    return tuple((n, lambda c, n=n: getattr(c, n) > 0, "must be positive") for n in names)


def validate(obj: Any, rules: tuple[Rule, ...]) -> None:
    """Checks every ``Literal`` field's value, then ``rules`` in order.

    Raises:
      ValueError on the first failure: ``Class.field = value: rule``.
    """
    for name, tp in field_types(type(obj)).items():
        if _is_literal(tp) and getattr(obj, name) not in typing.get_args(tp):
            _fail(obj, name, f"must be one of {typing.get_args(tp)}")
    for name, ok, rule in rules:
        if not ok(obj):
            _fail(obj, name, rule.format(c=obj))


def _fail(obj: Any, name: str, rule: str) -> None:
    raise ValueError(f"{type(obj).__name__}.{name} = {getattr(obj, name)!r}: {rule}")


def field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def build(cls: type, fields: Mapping[str, Any], prefix: str = "") -> Any:
    """``cls`` from a JSON-like dict, recursing into nested config dataclasses; raises
    naming an unknown field (by its dotted path) or a value of the wrong type."""
    types = field_types(cls)
    unknown = sorted(set(fields) - set(types))
    if unknown:
        raise ValueError(f"unknown model config field(s) {[prefix + u for u in unknown]}")
    return cls(**{k: coerce(prefix + k, v, types[k]) for k, v in fields.items()})


def apply_overrides(
    obj: Any,
    overrides: Mapping[str, Any] | Iterable[str],
    aliases: Mapping[str, str],
    known: Iterable[str],
) -> Any:
    """``obj`` with ``key=value`` strings (or a dict of strings or values) applied at once.

    A key is a field, a dotted path into nested dataclasses, or a name in ``aliases``
    (-> its dotted path). Values are converted by field type; an unknown key raises,
    listing ``known``.
    """
    if not isinstance(overrides, Mapping):
        overrides = dict(_split_kv(o) for o in overrides)
    tree: dict[str, Any] = {}  # field -> (key, value) or a subtree
    for key, value in overrides.items():
        *parents, leaf = aliases.get(key, key).split(".")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = (key, value)
    return _apply(obj, tree, sorted(known))


def _apply(obj: Any, tree: dict[str, Any], known: list[str]) -> Any:
    types = field_types(type(obj)) if dataclasses.is_dataclass(obj) else {}
    changes = {}
    for head, sub in tree.items():
        if head not in types:
            while isinstance(sub, dict):
                sub = next(iter(sub.values()))
            raise ValueError(f"unknown model config field {sub[0]!r}; known: {known}")
        if isinstance(sub, dict):
            changes[head] = _apply(getattr(obj, head), sub, known)
        else:
            changes[head] = parse_value(sub[0], sub[1], types[head])
    return dataclasses.replace(obj, **changes)


def _split_kv(text: str) -> tuple[str, str]:
    if "=" not in text:
        raise ValueError(f"override {text!r} is not of the form key=value")
    key, value = text.split("=", 1)
    return key.strip(), value.strip()


def _is_literal(tp: Any) -> bool:
    return typing.get_origin(tp) is Literal


def _base(tp: Any) -> tuple[Any, bool]:
    """(the type without ``| None``, whether None is allowed)."""
    args = typing.get_args(tp)
    if type(None) in args and not _is_literal(tp):
        return next(a for a in args if a is not type(None)), True
    return tp, False


def parse_value(key: str, text: Any, tp: Any) -> Any:
    """Converts an override string to the field's type (a nested dataclass from JSON, by
    its ``from_dict`` when it has one); raises naming the field."""
    if not isinstance(text, str):
        return coerce(key, text, tp)
    base, optional = _base(tp)
    if optional and text.lower() in ("none", "null"):
        return None
    if dataclasses.is_dataclass(base):
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{key}: expected a JSON object or none, got {text!r}") from e
        return base.from_dict(d) if hasattr(base, "from_dict") else coerce(key, d, base)
    if _is_literal(base) or base is str:
        return text
    try:
        if base is bool:
            if text.lower() not in ("true", "false", "1", "0"):
                raise ValueError
            return text.lower() in ("true", "1")
        return base(text)
    except ValueError:
        raise ValueError(f"{key}: expected {base.__name__}, got {text!r}") from None


def coerce(key: str, value: Any, tp: Any) -> Any:
    """Type-checks a JSON value against the field type (ints accepted for floats, dicts
    for nested dataclasses)."""
    base, optional = _base(tp)
    if value is None and optional:
        return None
    if dataclasses.is_dataclass(base):
        if isinstance(value, dict):
            return build(base, value, key + ".")
        if not isinstance(value, base):
            raise ValueError(f"ModelConfig.{key}: expected a {base.__name__}, got {value!r}")
        return value
    if _is_literal(base):
        return value
    if base is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if base is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(base, type) and not isinstance(value, base):
        raise ValueError(f"ModelConfig.{key}: expected {base.__name__}, got {value!r}")
    return value
