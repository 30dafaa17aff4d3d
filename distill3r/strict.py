"""Strict dataclasses from plain mappings: unknown keys, missing keys, wrong types and values
outside a ``Literal[...]`` raise ``ValueError`` naming the dotted key.

``from_dict(cls, values, where)`` builds ``cls`` (nested dataclasses, lists, optionals, unions,
literals); :func:`check_choices` applies the ``Literal`` rule to a dataclass built in code, so a
``validate()`` method rejects the same values whether the instance came from YAML or from Python;
:func:`require` and :func:`check_device` are the range and device-name checks those methods use.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from typing import Any, Literal, Union

_DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


def _type_name(tp: Any) -> str:
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (Union, types.UnionType):
        names = [_type_name(a) for a in args if a is not type(None)]
        return " or ".join(names) + (" or null" if type(None) in args else "")
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def choice_error(where: str, value: Any, choices: tuple) -> ValueError:
    """``ValueError("<where>: 'x' is not one of 'a', 'b'")``."""
    return ValueError(f"{where}: {value!r} is not one of {', '.join(repr(c) for c in choices)}")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp`` (building nested dataclasses)."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if isinstance(value, bool) or value not in choices:
            raise choice_error(where, value, choices)
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        literal = [a for a in args if typing.get_origin(a) is Literal]
        if len(literal) == 1 and isinstance(value, str):
            return _coerce(value, literal[0], where)  # name the choices, not the union
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ValueError:
                continue
        raise ValueError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ValueError(f"{where}: expected a mapping, got {value!r}")
        return from_dict(tp, value, where)
    if origin is list:
        (item_tp,) = typing.get_args(tp) or (Any,)
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is Any:
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ValueError(f"{where}: expected a string, got {value!r}")
        return value
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    return value


def from_dict(cls: type, values: dict[str, Any] | None, where: str | None = None) -> Any:
    """Build dataclass ``cls`` from ``values``; reject unknown keys, wrong types and values
    outside a ``Literal``."""
    where = where or cls.__name__
    values = values or {}
    if not isinstance(values, dict):
        raise ValueError(f"{where}: expected a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(
            f"{where}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(names))}"
        )
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in values:
            kwargs[f.name] = _coerce(values[f.name], hints[f.name], f"{where}.{f.name}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ValueError(f"{where}: missing required key {f.name}")
    return cls(**kwargs)


def _literal_choices(tp: Any) -> tuple | None:
    if typing.get_origin(tp) is Literal:
        return typing.get_args(tp)
    if typing.get_origin(tp) in (Union, types.UnionType):
        for arg in typing.get_args(tp):
            if typing.get_origin(arg) is Literal:
                return typing.get_args(arg)
    return None


def check_choices(obj: Any, where: str) -> None:
    """``ValueError`` for a ``Literal``-typed field of dataclass ``obj`` (or of the items of a
    ``list[Literal[...]]`` field) holding a value outside its choices."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        tp, value = hints[f.name], getattr(obj, f.name)
        if typing.get_origin(tp) is list and isinstance(value, list):
            choices = _literal_choices(typing.get_args(tp)[0])
            items = [(f"{where}.{f.name}[{i}]", v) for i, v in enumerate(value)]
        else:
            choices, items = _literal_choices(tp), [(f"{where}.{f.name}", value)]
        if choices is None:
            continue
        for key, v in items:
            if v not in choices and not (v is None and _allows_none(tp)):
                raise choice_error(key, v, choices)


def _allows_none(tp: Any) -> bool:
    return type(None) in typing.get_args(tp)


def require(checks: list[tuple[str, bool, str]], obj: Any, where: str) -> None:
    """Raise ``ValueError("<where>.<key>=<value>: <rule>")`` for the first failed check."""
    for key, ok, rule in checks:
        if not ok:
            raise ValueError(f"{where}.{key}={getattr(obj, key)!r}: {rule}")


def check_device(value: str, key: str) -> None:
    if not _DEVICE.fullmatch(value):
        raise ValueError(f"{key}: {value!r} is not a device; use auto, cpu, cuda, cuda:N or mps")


def to_dict(obj: Any) -> Any:
    """A dataclass (or nested structure of them) as plain dicts and lists."""
    return dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else obj


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (lists stay values): for MLflow params."""
    out: dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out
