"""Values checked against the record classes a schema holds inside it (``Optional[RankState]``,
``list[RankState]``, ``dict[str, RankState]``, unions).

msgspec encodes a record (a Struct, a dataclass, an Enum member) by its fields or its value, and
decodes those bytes into whatever class the schema names there: an ``EmptyState`` sent where the
schema says ``Optional[RankState]`` arrives as a ``RankState``, the fields it lacks defaulted and
its own dropped, on every rank alike, with no error. A bare record class is checked on the
sender by ``isinstance`` (``SchemaInfo.record_class``); a schema with records inside it gets a
walk of the value along the schema, done on the sender before anything is sent.

The walk is a tree of nodes, one per place in the schema that holds records. Each node is
callable (the *check*: what was found where, or None) and writes itself as a Python expression
(the *test*: fits or not); a schema's tests are compiled into one function, since the walk runs
on every call of a hot collective and a chain of closures cost about a microsecond a record.
A test may say "no" where the check finds nothing (an int where ``Optional[RankState]`` is
declared: msgspec's to refuse): the check then decides, so the test only ever saves work.

The walk is offered as a class whose ``isinstance`` runs it (``fits_class``): the C fast path
tests ``isinstance(value, record_class)`` before it encodes, and hands a value that fails to the
Python steps, which say what was found where (``check``). One test serves both paths.
"""

from __future__ import annotations

import collections.abc as abc
import dataclasses
import enum
import keyword
import types
import typing
from itertools import repeat
from typing import Any, Callable, Dict, List, Optional, Tuple

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
        fields = _fields_of(schema, 0)
        return None if fields is None else _Record(schema, fields)
    return _node(schema, 0)


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


def _node(t: Any, depth: int) -> Optional["_Node"]:
    if depth > _MAX_DEPTH:
        return None
    t = _unwrap(t)
    if is_record_class(t):
        return _Record(t, _fields_of(t, depth))
    origin, args = typing.get_origin(t), typing.get_args(t)
    if is_record_class(origin):  # a generic Struct, Outer[int]
        return _Record(origin, None)
    if origin is typing.Union or origin is types.UnionType:
        return _union(args, depth)
    if origin in _SEQUENCE_ORIGINS or (origin is tuple and len(args) == 2
                                       and args[1] is Ellipsis):
        item = _node(args[0], depth + 1) if args else None
        return None if item is None else _Each(item, origin)
    if origin is tuple and args:
        checks = [_node(a, depth + 1) for a in args]
        return None if not any(checks) else _Positions(checks)
    if origin in _MAPPING_ORIGINS and len(args) == 2:
        value = _node(args[1], depth + 1)
        return None if value is None else _Values(value)
    return None


def _fields_of(t: type, depth: int) -> Optional["_Fields"]:
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
              for c in [_node(hints[f.name], depth + 1)] if c is not None]
    return _Fields(checks) if checks else None


def _plain_name(name: str) -> bool:
    return name.isidentifier() and not keyword.iskeyword(name) and not name.startswith("__")


def _at(problem: str, where: str) -> str:
    """``E at [1]`` found inside ``where`` reads ``E at <where>[1]``: outermost first."""
    found, _, path = problem.partition(" at ")
    return f"{found} at {where}{path}"


class _Node:
    """One place of the walk: called, the check; ``test(var, first, source)``, the test's
    expression of the value named ``var``, written ``first`` where the expression first reads
    it (``(_v1 := getattr(v, 'state', None))``: computed once, then read by name)."""

    def __call__(self, v: Any) -> Optional[str]:
        raise NotImplementedError

    def test(self, var: str, first: str, source: "_Source") -> str:
        # The general form, right for every node: its check found nothing.
        return f"{source.ref(self)}({first}) is None"


class _Record(_Node):
    def __init__(self, t: type, fields: Optional["_Fields"]) -> None:
        self.t, self.fields = t, fields
        # A leaf: a list of them is tested in C (``_Each``).
        self.klass = t if fields is None else None

    def __call__(self, v: Any) -> Optional[str]:
        if not isinstance(v, self.t):
            return found_text(v)
        return self.fields(v) if self.fields is not None else None

    def test(self, var: str, first: str, source: "_Source") -> str:
        head = f"isinstance({first}, {source.ref(self.t)})"
        if self.fields is None:
            return head
        return f"({head} and {self.fields.test(var, var, source)})"


class _Fields(_Node):
    def __init__(self, checks: List[Tuple[str, _Node]]) -> None:
        self.checks = checks

    def __call__(self, v: Any) -> Optional[str]:
        for name, c in self.checks:
            problem = c(getattr(v, name, None))
            if problem is not None:
                return _at(problem, f".{name}")
        return None

    def test(self, var: str, first: str, source: "_Source") -> str:
        # Only ever reached as a record's, after the record read its value. A field read as
        # an attribute, not getattr's call: one that is missing raises, and the check decides.
        return "(" + " and ".join(source.inline(c, f"{var}.{name}" if _plain_name(name) else
                                                f"getattr({var}, {name!r}, None)")
                                  for name, c in self.checks) + ")"


class _Each(_Node):
    def __init__(self, item: _Node, origin: Any) -> None:
        self.item = item
        self.kinds = (list, tuple) if origin is tuple else _SEQUENCES
        self.klass = getattr(item, "klass", None)

    def __call__(self, v: Any) -> Optional[str]:
        if not isinstance(v, self.kinds):
            return None
        if self.klass is not None and all(map(isinstance, v, repeat(self.klass))):
            return None  # the common case, at C speed: what fails is found below
        for i, x in enumerate(v):
            problem = self.item(x)
            if problem is not None:
                return _at(problem, f"[{i}]") if isinstance(v, (list, tuple)) else problem
        return None

    def test(self, var: str, first: str, source: "_Source") -> str:
        return (f"(not isinstance({first}, {source.ref(self.kinds)}) or "
                f"{source.all(self.item, var)})")


class _Positions(_Node):
    def __init__(self, checks: List[Optional[_Node]]) -> None:
        self.checks = checks

    def __call__(self, v: Any) -> Optional[str]:
        if isinstance(v, (list, tuple)) and len(v) == len(self.checks):
            for i, (c, x) in enumerate(zip(self.checks, v)):
                problem = c(x) if c is not None else None
                if problem is not None:
                    return _at(problem, f"[{i}]")
        return None

    def test(self, var: str, first: str, source: "_Source") -> str:
        items = " and ".join(source.inline(c, f"{var}[{i}]")
                             for i, c in enumerate(self.checks) if c is not None)
        return (f"(not (isinstance({first}, (list, tuple)) and len({var}) == "
                f"{len(self.checks)}) or ({items}))")


class _Values(_Node):
    def __init__(self, value: _Node) -> None:
        self.value = value

    def __call__(self, v: Any) -> Optional[str]:
        if isinstance(v, dict):
            for k, x in v.items():
                problem = self.value(x)
                if problem is not None:
                    return _at(problem, f"[{k!r}]")
        return None

    def test(self, var: str, first: str, source: "_Source") -> str:
        return (f"(not isinstance({first}, dict) or "
                f"{source.all(self.value, f'{var}.values()')})")


class _Union(_Node):
    def __init__(self, records: Dict[type, _Record], inner: List[_Node], anything: bool,
                 takes_dicts: bool, plain: Tuple[type, ...]) -> None:
        self.by_class, self.inner = records, inner
        self.anything, self.takes_dicts, self.plain = anything, takes_dicts, plain

    def __call__(self, v: Any) -> Optional[str]:
        if v is None:
            return None  # None where the schema has no None fails at decoding, as before
        for r, c in self.by_class.items():
            if isinstance(v, r):
                return c(v)
        if self.anything or (self.plain and isinstance(v, self.plain)):
            return None  # another member takes it as it is (an IntEnum member as an int)
        if _is_record_value(v) or (isinstance(v, dict) and self.by_class
                                   and not self.takes_dicts):
            return found_text(v)  # a record of a class the union lacks, or a bare dict
        problems = [c(v) for c in self.inner]
        return None if not problems or None in problems else problems[0]

    def test(self, var: str, first: str, source: "_Source") -> str:
        if self.inner or self.anything or self.plain:
            return super().test(var, first, source)
        # Records and None only (Optional[RankState]): the first class it is an instance of
        # decides, as in the check; anything else is the check's to judge.
        if all(c.fields is None for c in self.by_class.values()):
            return f"({first} is None or isinstance({var}, {source.ref(tuple(self.by_class))}))"
        choice = "False"
        for r, c in reversed(list(self.by_class.items())):
            test = "True" if c.fields is None else c.test(var, var, source)
            choice = f"({test} if isinstance({var}, {source.ref(r)}) else {choice})"
        return f"({first} is None or {choice})"


def _union(args: Tuple[Any, ...], depth: int) -> Optional[_Node]:
    records = tuple(a for a in args if is_record_class(a))
    others = [a for a in args if not is_record_class(a) and a is not type(None)]
    inner = [c for c in (_node(a, depth + 1) for a in others) if c is not None]
    if not records and not inner:
        return None
    anything = any(_unwrap(a) is Any for a in others)
    takes_dicts = anything or any(_unwrap(a) is dict or typing.get_origin(_unwrap(a)) in
                                  _MAPPING_ORIGINS for a in others)
    plain = tuple(u for u in map(_unwrap, others) if isinstance(u, type) and u is not Any)
    by_class = {r: _Record(r, _fields_of(r, depth + 1)) for r in records}
    return _Union(by_class, inner, anything, takes_dicts, plain)


class _Source:
    """The text of one schema's test: one function for the schema and one per kind of item a
    container holds (``map`` calls it), the rest inline."""

    def __init__(self) -> None:
        self.names: Dict[str, Any] = {"isinstance": isinstance, "getattr": getattr,
                                      "all": all, "map": map, "len": len}
        self.refs: Dict[int, str] = {}
        self.functions: Dict[int, str] = {}
        self.lines: List[str] = []
        self.locals = 0

    def ref(self, obj: Any) -> str:
        name = self.refs.get(id(obj))
        if name is None:
            name = self.refs[id(obj)] = f"_r{len(self.refs)}"
            self.names[name] = obj
        return name

    def function(self, node: _Node) -> str:
        name = self.functions.get(id(node))
        if name is None:
            name = self.functions[id(node)] = f"_t{len(self.functions)}"
            self.lines.append(f"def {name}(v):\n    return {node.test('v', 'v', self)}\n")
        return name

    def inline(self, node: _Node, expression: str) -> str:
        """``node``'s test of what ``expression`` computes, computed once."""
        self.locals += 1
        var = f"_v{self.locals}"
        return node.test(var, f"({var} := {expression})", self)

    def all(self, item: _Node, iterable: str) -> str:
        klass = getattr(item, "klass", None)
        if klass is not None:
            # What isinstance(x, klass) calls past its exact-type shortcut, already bound.
            test = types.MethodType(type(klass).__instancecheck__, klass)
            return f"all(map({self.ref(test)}, {iterable}))"
        return f"all(map({self.function(item)}, {iterable}))"

    def compile(self, node: _Node) -> Callable[[Any], bool]:
        top = self.function(node)
        exec("\n".join(self.lines), self.names)  # text built above from this module's parts
        test: Callable[[Any], bool] = self.names[top]
        return test


class _Fits(type):
    check: Check
    test: Callable[[Any], bool]

    def __instancecheck__(cls, value: Any) -> bool:
        try:
            if cls.test(value):
                return True
        except Exception:  # what a value's own attribute raises: the check's to meet
            pass
        return cls.check(value) is None


def fits_class(check: Check, name: str) -> type:
    """A class whose ``isinstance`` is ``check(value) is None``."""
    test: Callable[[Any], bool] = lambda v: False  # the check decides every value
    if isinstance(check, _Node):
        try:
            test = _Source().compile(check)
        except (SyntaxError, RecursionError, MemoryError, ValueError):  # a schema too deep or
            pass  # wide for one expression: the check alone is as right, only slower
    return _Fits(f"fits {name}", (), {"check": staticmethod(check), "test": staticmethod(test)})
