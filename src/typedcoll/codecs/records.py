"""Values checked against the record classes a schema holds inside it (``Optional[RankState]``,
``list[RankState]``, ``dict[str, RankState]``, unions).

msgspec encodes a record (a Struct, a dataclass, an Enum member) by its fields or its value, and
decodes those bytes into whatever class the schema names there: an ``EmptyState`` sent where the
schema says ``Optional[RankState]`` arrives as a ``RankState``, the fields it lacks defaulted and
its own dropped, on every rank alike, with no error. A bare record class is checked on the
sender by ``isinstance`` (``SchemaInfo.record_class``); a schema with records inside it gets a
walk of the value along the schema, done on the sender before anything is sent.

The walk is offered as a class whose ``isinstance`` runs it (``fits_class``): the C fast path
tests ``isinstance(value, record_class)`` before it encodes, and hands a value that fails to the
Python steps, which say what was found where (``check``). One test serves both paths.
"""

from __future__ import annotations

import dataclasses
import enum
import types
import typing
from typing import Any, Callable, List, Optional, Tuple

import msgspec

# What a value holds that the schema does not admit there ("EmptyState at [3]"), or None.
Check = Callable[[Any], Optional[str]]

_MAX_DEPTH = 16  # schemas nest no deeper in practice; a recursive alias stops here
_SEQUENCES = (list, tuple, set, frozenset)


def is_record_class(t: Any) -> bool:
    return isinstance(t, type) and (issubclass(t, (msgspec.Struct, enum.Enum))
                                    or dataclasses.is_dataclass(t))


def _is_record_value(value: Any) -> bool:
    return (isinstance(value, (msgspec.Struct, enum.Enum))
            or (dataclasses.is_dataclass(value) and not isinstance(value, type)))


def found_text(value: Any) -> str:
    return "None" if value is None else type(value).__name__


def nested_check(schema: Any) -> Optional[Check]:
    """The walk for ``schema`` where a record class sits inside it; None where none does (a
    bare record class is ``record_class``'s, every other schema msgspec's own to decode)."""
    if is_record_class(schema):
        return None
    return _check(schema, 0)


def _check(t: Any, depth: int) -> Optional[Check]:
    if depth > _MAX_DEPTH:
        return None
    if is_record_class(t):
        return lambda v: None if isinstance(v, t) else found_text(v)
    origin, args = typing.get_origin(t), typing.get_args(t)
    if origin is typing.Union or origin is types.UnionType:
        return _union(args, depth)
    if origin in (list, set, frozenset) or (origin is tuple and len(args) == 2
                                            and args[1] is Ellipsis):
        item = _check(args[0], depth + 1) if args else None
        return None if item is None else _each(item, origin)
    if origin is tuple and args:
        checks = [_check(a, depth + 1) for a in args]
        return None if not any(checks) else _positions(checks)
    if origin is dict and len(args) == 2:
        value = _check(args[1], depth + 1)
        return None if value is None else _values(value)
    return None


def _union(args: Tuple[Any, ...], depth: int) -> Optional[Check]:
    records = tuple(a for a in args if is_record_class(a))
    others = [a for a in args if not is_record_class(a) and a is not type(None)]
    inner = [c for c in (_check(a, depth + 1) for a in others) if c is not None]
    if not records and not inner:
        return None
    takes_dicts = any(a is dict or typing.get_origin(a) is dict or a is Any for a in others)

    def union(v: Any) -> Optional[str]:
        if v is None or (records and isinstance(v, records)):
            return None  # None where the schema has no None fails at decoding, as before
        if _is_record_value(v) or (isinstance(v, dict) and records and not takes_dicts):
            return found_text(v)  # a record of a class the union lacks, or a bare dict
        problems = [c(v) for c in inner]
        return None if not problems or None in problems else problems[0]
    return union


def _each(item: Check, origin: Any) -> Check:
    kinds = _SEQUENCES if origin is not tuple else (list, tuple)

    def each(v: Any) -> Optional[str]:
        if isinstance(v, kinds):
            for i, x in enumerate(v):
                problem = item(x)
                if problem is not None:
                    return f"{problem} at [{i}]" if origin in (list, tuple) else problem
        return None
    return each


def _positions(checks: List[Optional[Check]]) -> Check:
    def positions(v: Any) -> Optional[str]:
        if isinstance(v, (list, tuple)) and len(v) == len(checks):
            for i, (c, x) in enumerate(zip(checks, v)):
                problem = c(x) if c is not None else None
                if problem is not None:
                    return f"{problem} at [{i}]"
        return None
    return positions


def _values(value: Check) -> Check:
    def values(v: Any) -> Optional[str]:
        if isinstance(v, dict):
            for k, x in v.items():
                problem = value(x)
                if problem is not None:
                    return f"{problem} at [{k!r}]"
        return None
    return values


class _Fits(type):
    check: Check

    def __instancecheck__(cls, value: Any) -> bool:
        return cls.check(value) is None


def fits_class(check: Check, name: str) -> type:
    """A class whose ``isinstance`` is ``check(value) is None``."""
    return _Fits(f"fits {name}", (), {"check": staticmethod(check)})
