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

import collections.abc as abc
import dataclasses
import enum
import types
import typing
from itertools import repeat
from typing import Any, Callable, List, Optional, Tuple

import msgspec

# What a value holds that the schema does not admit there ("EmptyState at [3]"), or None.
Check = Callable[[Any], Optional[str]]

_MAX_DEPTH = 16  # schemas nest no deeper in practice; a recursive alias stops here
_SEQUENCES = (list, tuple, set, frozenset)
_SEQUENCE_ORIGINS = (list, set, frozenset, abc.Sequence, abc.MutableSequence, abc.Set,
                     abc.MutableSet, abc.Collection, abc.Iterable)
_MAPPING_ORIGINS = (dict, abc.Mapping, abc.MutableMapping)


def is_record_class(t: Any) -> bool:
    return isinstance(t, type) and (issubclass(t, (msgspec.Struct, enum.Enum))
                                    or dataclasses.is_dataclass(t))


def _is_record_value(value: Any) -> bool:
    return (isinstance(value, (msgspec.Struct, enum.Enum))
            or (dataclasses.is_dataclass(value) and not isinstance(value, type)))


def found_text(value: Any) -> str:
    return "None" if value is None else type(value).__name__


def nested_check(schema: Any) -> Optional[Check]:
    """The walk for ``schema`` where a record class sits inside it, or inside a record's
    fields; None where none does (a bare record class whose fields hold none is
    ``record_class``'s isinstance, every other schema msgspec's own to decode)."""
    if is_record_class(schema):
        fields = _fields_check(schema, 0)
        return None if fields is None else _record(schema, fields)
    return _check(schema, 0)


def _unwrap(t: Any) -> Any:
    """``Annotated[T, ...]`` and ``NewType("N", T)`` are ``T`` on the wire."""
    while True:
        if typing.get_origin(t) is typing.Annotated:
            t = typing.get_args(t)[0]
        elif callable(getattr(t, "__supertype__", None)) or \
                isinstance(getattr(t, "__supertype__", None), type):
            t = t.__supertype__
        else:
            return t


def _check(t: Any, depth: int) -> Optional[Check]:
    if depth > _MAX_DEPTH:
        return None
    t = _unwrap(t)
    if is_record_class(t):
        return _record(t, _fields_check(t, depth))
    origin, args = typing.get_origin(t), typing.get_args(t)
    if is_record_class(origin):  # a generic Struct, Outer[int]
        return _record(origin, None)
    if origin is typing.Union or origin is types.UnionType:
        return _union(args, depth)
    if origin in _SEQUENCE_ORIGINS or (origin is tuple and len(args) == 2
                                       and args[1] is Ellipsis):
        item = _check(args[0], depth + 1) if args else None
        return None if item is None else _each(item, origin)
    if origin is tuple and args:
        checks = [_check(a, depth + 1) for a in args]
        return None if not any(checks) else _positions(checks)
    if origin in _MAPPING_ORIGINS and len(args) == 2:
        value = _check(args[1], depth + 1)
        return None if value is None else _values(value)
    return None


def _record(t: type, fields: Optional[Check]) -> Check:
    def record(v: Any) -> Optional[str]:
        if not isinstance(v, t):
            return found_text(v)
        return fields(v) if fields is not None else None
    if fields is None:
        record.klass = t  # type: ignore[attr-defined]  # a list of them is tested in C
    return record


def _fields_check(t: type, depth: int) -> Optional[Check]:
    """The walk of a record's fields that hold records (``inner: Optional[RankState]``)."""
    if not (isinstance(t, type) and issubclass(t, msgspec.Struct)) and \
            not dataclasses.is_dataclass(t):
        return None
    try:
        hints = typing.get_type_hints(t, include_extras=True)
    except Exception:  # an annotation that does not resolve: msgspec's to refuse
        return None
    names = msgspec.structs.fields(t) if issubclass(t, msgspec.Struct) else \
        dataclasses.fields(t)
    checks = [(f.name, c) for f in names if f.name in hints
              for c in [_check(hints[f.name], depth + 1)] if c is not None]
    if not checks:
        return None

    def fields(v: Any) -> Optional[str]:
        for name, c in checks:
            problem = c(getattr(v, name, None))
            if problem is not None:
                return _at(problem, f".{name}")
        return None
    return fields


def _at(problem: str, where: str) -> str:
    """``E at [1]`` found inside ``where`` reads ``E at <where>[1]``: outermost first."""
    found, _, path = problem.partition(" at ")
    return f"{found} at {where}{path}"


def _union(args: Tuple[Any, ...], depth: int) -> Optional[Check]:
    records = tuple(a for a in args if is_record_class(a))
    others = [a for a in args if not is_record_class(a) and a is not type(None)]
    inner = [c for c in (_check(a, depth + 1) for a in others) if c is not None]
    if not records and not inner:
        return None
    anything = any(_unwrap(a) is Any for a in others)
    takes_dicts = anything or any(_unwrap(a) is dict or typing.get_origin(_unwrap(a)) in
                                  _MAPPING_ORIGINS for a in others)
    plain = tuple(u for u in map(_unwrap, others) if isinstance(u, type) and u is not Any)
    by_class = {r: _record(r, _fields_check(r, depth + 1)) for r in records}

    def union(v: Any) -> Optional[str]:
        if v is None:
            return None  # None where the schema has no None fails at decoding, as before
        for r, c in by_class.items():
            if isinstance(v, r):
                return c(v)
        if anything or (plain and isinstance(v, plain)):
            return None  # another member takes it as it is (an IntEnum member as an int)
        if _is_record_value(v) or (isinstance(v, dict) and records and not takes_dicts):
            return found_text(v)  # a record of a class the union lacks, or a bare dict
        problems = [c(v) for c in inner]
        return None if not problems or None in problems else problems[0]
    return union


def _each(item: Check, origin: Any) -> Check:
    kinds = (list, tuple) if origin is tuple else _SEQUENCES
    klass = getattr(item, "klass", None)

    def each(v: Any) -> Optional[str]:
        if not isinstance(v, kinds):
            return None
        if klass is not None and all(map(isinstance, v, repeat(klass))):
            return None  # the common case, at C speed: what fails is found below
        for i, x in enumerate(v):
            problem = item(x)
            if problem is not None:
                return _at(problem, f"[{i}]") if isinstance(v, (list, tuple)) else problem
        return None
    return each


def _positions(checks: List[Optional[Check]]) -> Check:
    def positions(v: Any) -> Optional[str]:
        if isinstance(v, (list, tuple)) and len(v) == len(checks):
            for i, (c, x) in enumerate(zip(checks, v)):
                problem = c(x) if c is not None else None
                if problem is not None:
                    return _at(problem, f"[{i}]")
        return None
    return positions


def _values(value: Check) -> Check:
    def values(v: Any) -> Optional[str]:
        if isinstance(v, dict):
            for k, x in v.items():
                problem = value(x)
                if problem is not None:
                    return _at(problem, f"[{k!r}]")
        return None
    return values


class _Fits(type):
    check: Check

    def __instancecheck__(cls, value: Any) -> bool:
        return cls.check(value) is None


def fits_class(check: Check, name: str) -> type:
    """A class whose ``isinstance`` is ``check(value) is None``."""
    return _Fits(f"fits {name}", (), {"check": staticmethod(check)})
