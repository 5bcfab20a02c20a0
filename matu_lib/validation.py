"""Typed checks of run parameters against ``RunConfig``, before any work starts.

``--set rounds=2.5`` on the command line, ``OVERRIDES = {"rounds": "3"}`` in a notebook and
``preset("cpu", rounds=2.5)`` all end here: each value is checked (and, where unambiguous, converted)
against the field's annotated type, and a mismatch is one line naming the field, the expected type and
the value given. Nothing is written before this passes, so a typo never leaves a half-made results folder.
"""

from __future__ import annotations

import math
import types
import typing
from dataclasses import fields


def _type_name(tp: object) -> str:
    if tp is type(None):
        return "none"
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(name: str, value: object, tp: object) -> object:
    """``value`` as type ``tp``, or ValueError naming the field. Conversions: int -> float, a bare string
    or comma list -> a tuple of strings (``tasks=mnist``), a list -> a tuple."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(name, value, arg)
            except ValueError as err:
                errors.append(err)
        raise ValueError(f"{name} must be {' or '.join(_type_name(a) for a in args)}, got {value!r}")
    if origin is tuple:
        if isinstance(value, str) and args and args[0] is str:
            value = tuple(part.strip() for part in value.split(",") if part.strip())
        if not isinstance(value, (tuple, list)):
            raise ValueError(f"{name} must be a tuple of {_type_name(args[0]) if args else 'values'}, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(f"{name}[{i}]", v, args[0]) for i, v in enumerate(value))
        if len(value) != len(args):
            raise ValueError(f"{name} must be a tuple of {len(args)} values, got {value!r}")
        return tuple(_coerce(f"{name}[{i}]", v, a) for i, (v, a) in enumerate(zip(value, args)))
    if tp is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ValueError(f"{name} must be a string, got {value!r}")
        return value
    return value


def check_overrides(cls: type, overrides: dict) -> dict:
    """``overrides`` checked and converted against the dataclass ``cls``'s field types; unknown keys raise
    TypeError, wrong types ValueError, each one line naming the field."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise TypeError(f"unknown config keys {unknown}; valid keys: {sorted(known)}")
    hints = typing.get_type_hints(cls)
    return {k: _coerce(k, v, hints[k]) for k, v in overrides.items()}
