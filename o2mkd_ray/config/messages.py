"""Pydantic's validation errors, said as one line users read: ``<key>: <what>; <what to do>``.

Pydantic reports every problem it finds, with its own wording and a location tuple. Users get one line, with the
dotted key (``ray.segment_overrides.7.num_workers``, ``data.value_range[1]``) and the wording this package has
always used, so the wording is built here from the declared type at that key, never taken from pydantic.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any, Literal

from annotated_types import Ge, GroupedMetadata, Gt, Le, Lt
from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo

from o2mkd_ray.errors import ConfigError

# errors about a well-typed value; any other error is about the type or shape of the input
_VALUE_ERRORS = {"greater_than", "greater_than_equal", "less_than", "less_than_equal", "value_error",
                 "assertion_error"}


def config_error(exc: ValidationError, cls: type, data: Any, prefix: str = "") -> ConfigError:
    """The one-line :class:`ConfigError` for a pydantic ``ValidationError``.

    A wrong type or unknown key is reported before a bad value, the first in the input's own order, as a loader
    that stops at the first problem would (the input is read top to bottom, then values are checked).

    Args:
        exc: what pydantic raised while validating ``data`` as ``cls``.
        cls: the model (or dataclass) that was validated.
        data: the input it was given (for the offending value and the input order).
        prefix: the dotted key of ``cls`` in the config tree ("" for the root).
    Returns:
        The ConfigError to raise (pydantic's text is not in it).
    """
    errors = _branch_of_the_input(exc.errors(include_url=False), cls, data)
    typed = [e for e in errors if e["type"] not in _VALUE_ERRORS]
    err = min(typed, key=lambda e: _input_rank(data, e["loc"])) if typed else errors[0]
    return ConfigError(_message(err, cls, data, prefix))


def _branch_of_the_input(errors: list[dict], cls: type, data: Any) -> list[dict]:
    """For a one-or-one-per-segment union (``int | list[int]``) pydantic reports each member's failure, tagged in
    the location (``'constrained-int'``, ``'list[constrained-int]'``); keep the member the input was meant for (a
    list: the list member), so ``0`` reads ``must be > 0`` and ``[1, 0]`` names the bad entry ``[1]``."""

    def wrong_branch(e: dict) -> bool:
        i = _resolve(cls, e["loc"], "", stop_at_tag=True)[2]
        if i >= len(e["loc"]):
            return False
        given = _value_at(data, e["loc"][:i], None)
        return isinstance(given, list) != str(e["loc"][i]).startswith("list[")

    kept = [e for e in errors if not wrong_branch(e)]
    return kept or errors


def _message(err: dict, cls: type, data: Any, prefix: str) -> str:
    loc = err["loc"]
    raised = (err.get("ctx") or {}).get("error")
    if isinstance(raised, ConfigError):
        return str(raised)  # our own rules already speak the user's language
    if err["type"] == "extra_forbidden":
        parent, owner, _ = _resolve(cls, loc[:-1], prefix)
        return _unknown_key(parent, str(loc[-1]), list(_fields(_strip(owner)) or ()))
    key, tp, used = _resolve(cls, loc, prefix)
    key = key or "config"
    if err["type"] in _VALUE_ERRORS:
        what = _bounds_message(tp, err["input"]) if _bounds(tp) else str(raised or f"bad value {err['input']!r}")
        return f"{key}: {what}"
    value = _value_at(data, loc[:used], err["input"])
    return f"{key}: {type_message(tp, value)}"


def _unknown_key(parent: str, name: str, names: list[str]) -> str:
    key = f"{parent}.{name}" if parent else name
    close = difflib.get_close_matches(name, names, n=1)
    hint = f"; did you mean '{parent + '.' if parent else ''}{close[0]}'?" if close else ""
    return f"unknown config key '{key}'{hint}"


def type_name(tp: Any) -> str:
    """How a type reads in a message: ``int``, ``list of float``, ``'final' | 'best'``, ``str or null``."""
    tp = _strip(tp)
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if _is_union(tp):
        return " or ".join(type_name(a) for a in typing.get_args(tp))
    if origin is list:
        (a,) = typing.get_args(tp)
        return f"list of {type_name(a)}"
    if origin is dict:
        return "mapping"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def type_message(tp: Any, value: Any) -> str:
    """``expected ..., got <value>`` (or ``must be one of ...``) for a value that is not of type ``tp``."""
    tp = _strip(tp)
    if typing.get_origin(tp) is Literal:
        return f"must be one of {type_name(tp)}, got {value!r}"
    if _is_union(tp) or typing.get_origin(tp) is list:
        return f"expected {type_name(tp)}, got {value!r}"
    if typing.get_origin(tp) is dict or tp is dict or _fields(tp) is not None:
        return f"expected a mapping, got {value!r}"
    simple = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    return f"expected {simple.get(tp, type_name(tp))}, got {value!r}"


def _bounds_message(tp: Any, value: Any) -> str:
    """``must be > 0, got 0`` / ``must be in [0, 1), got 1.0`` from the constraints declared on ``tp``."""
    lo = hi = None
    for m in _bounds(tp):
        if isinstance(m, (Gt, Ge)):
            lo = ("(", ">", m.gt) if isinstance(m, Gt) else ("[", ">=", m.ge)
        else:
            hi = (")", "<", m.lt) if isinstance(m, Lt) else ("]", "<=", m.le)
    if _scalar(tp) is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)  # an integer given for a float reads as the float it became
    if lo and hi:
        return f"must be in {lo[0]}{lo[2]}, {hi[2]}{hi[0]}, got {value}"
    _, op, bound = lo or hi
    return f"must be {op} {bound}, got {value}"


def _bounds(tp: Any) -> list:
    """The Gt/Ge/Lt/Le constraints declared on ``tp`` (through Optional, Annotated and pydantic Field)."""
    out: list = []

    def collect(items) -> None:
        for m in items:
            if isinstance(m, FieldInfo):
                collect(m.metadata)
            elif isinstance(m, GroupedMetadata):
                collect(list(m))
            elif isinstance(m, (Gt, Ge, Lt, Le)):
                out.append(m)

    for t in [tp, *(typing.get_args(tp) if _is_union(tp) else ())]:
        if typing.get_origin(t) is typing.Annotated:
            collect(t.__metadata__)
    return out


def _scalar(tp: Any) -> Any:
    """``float`` for ``Annotated[float, ...] | None`` and the like."""
    tp = _strip(tp)
    if _is_union(tp):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _scalar(args[0]) if len(args) == 1 else tp
    return tp


def _resolve(cls: type, loc: tuple, prefix: str, stop_at_tag: bool = False) -> tuple[str, Any, int]:
    """Walks ``loc`` down the declared types from ``cls``.

    A one-or-one-per-segment union (``X | list[X]``) is walked into through the member tag pydantic puts in the
    location; ``stop_at_tag``: stop there instead (the third value is then the tag's index in ``loc``).

    Returns:
        ``(dotted key, declared type there, how many loc parts were used)``; the walk stops at a union, because a
        value that fits no member is reported as a whole (``expected float or list of float, got [0.5, 'x']``).
    """
    key, tp = prefix, cls
    for used, part in enumerate(loc):
        base = _strip(tp)
        fields, origin = _fields(base), typing.get_origin(base)
        if _is_union(base):
            members = [a for a in typing.get_args(base) if a is not type(None)]
            lists = [a for a in members if typing.get_origin(_strip(a)) is list]
            if len(members) == 2 and len(lists) == 1 and isinstance(part, str):  # a member's tag: walk into it
                if stop_at_tag:
                    return key, tp, used
                tp = lists[0] if part.startswith("list[") else next(a for a in members if a is not lists[0])
                continue
            return key, tp, used
        if fields is not None and part in fields:
            key, tp = (f"{key}.{part}" if key else str(part)), fields[part]
        elif origin is list and isinstance(part, int):
            key, tp = f"{key}[{part}]", typing.get_args(base)[0]
        elif origin is dict:
            key, tp = (f"{key}.{part}" if key else str(part)), typing.get_args(base)[1]
        else:
            return key, tp, used
    return key, tp, len(loc)


def _fields(tp: Any) -> dict[str, Any] | None:
    """Field name -> declared type (constraints kept) of a model or dataclass; None for any other type."""
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return {name: f.rebuild_annotation() for name, f in tp.model_fields.items()}
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return typing.get_type_hints(tp, include_extras=True)
    return None


def _strip(tp: Any) -> Any:
    while typing.get_origin(tp) is typing.Annotated:
        tp = typing.get_args(tp)[0]
    return tp


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType)


def _value_at(data: Any, loc: tuple, default: Any) -> Any:
    """The input value at ``loc`` (dict keys, list indices, attributes), or ``default`` when it is not there."""
    node = data
    for part in loc:
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and isinstance(part, int) and -len(node) <= part < len(node):
            node = node[part]
        elif isinstance(part, str) and hasattr(node, part):
            node = getattr(node, part)
        else:
            return default
    return node


def _input_rank(data: Any, loc: tuple) -> tuple[int, ...]:
    """Position of ``loc`` in the input, to report problems in the order the user wrote them."""
    rank, node = [], data
    for part in loc:
        if isinstance(node, dict) and part in node:
            rank.append(list(node).index(part))
            node = node[part]
        elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            rank.append(part)
            node = node[part]
        else:
            break
    return tuple(rank)
