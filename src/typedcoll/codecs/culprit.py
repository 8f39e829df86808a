"""Where a value msgspec cannot encode goes wrong: the field, its declared type, what it holds.

msgspec's encoder names the type it refused ("Encoding objects of type Unencodable is
unsupported") or the limit it hit ("can't serialize ints < -2**63 ..."), never where in the
value: a Struct with one bad field read "expected Plan, got Plan". Messages need the field
("expected Plan.batch: int, got Unencodable"), so this walks the value down to the innermost
part that still fails to encode on its own. A cold path: it runs only after encoding failed,
and encodes each part it passes at most once per level.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator, Optional, Tuple

import msgspec
import msgspec.inspect as mi

from .nesting import MAX_NESTING
from .schema import ENCODER, render_name

_RECORDS = (mi.StructType, mi.DataclassType)


class Culprit:
    """The innermost part of a value that does not encode: ``where`` it is (``Plan.batch``,
    ``list[Plan][1].batch``), the type ``declared`` there and the one it ``got``."""

    __slots__ = ("where", "declared", "got")

    def __init__(self, where: str, declared: str, got: str) -> None:
        self.where = where
        self.declared = declared
        self.got = got


def locate(value: Any, schema: Any, root: Optional[str] = None) -> Optional[Culprit]:
    """The part of ``value`` (sent as ``schema``) that does not encode, or None where no part
    of it fails alone (``value`` itself is the culprit) or the value encodes after all.

    ``root`` names the value's start in ``where`` (``"$"`` in the drop-ins' paths); by default
    the value's own class where it is a record, else the schema's name.
    """
    t = _narrow(_type_info(schema), value)
    if not _fails(value):
        return None
    where = root if root is not None else _root_name(value, t)
    path = ""
    for _ in range(MAX_NESTING):
        step = next(((a, x, xt) for a, x, xt in _parts(value, t) if _fails(x)), None)
        if step is None:
            break
        accessor, value, t = step
        t = _narrow(t, value)
        path += accessor
    if not path:
        return None
    return Culprit(where + path, render_name(t), _got(value))


def _fails(value: Any) -> bool:
    try:
        ENCODER.encode(value)
    except RecursionError:  # this rank's stack, not the part: never the culprit
        return False
    except Exception:  # whatever msgspec or the encoding hook raises
        return True
    return False


def _type_info(schema: Any) -> mi.Type:
    try:
        return mi.type_info(schema)
    except Exception:  # a schema msgspec cannot describe: read the value alone
        return mi.AnyType()


def _narrow(t: mi.Type, value: Any) -> mi.Type:
    """The member of a union (or the class behind ``Any``) that ``value`` is encoded as."""
    while isinstance(t, mi.Metadata):
        t = t.type
    if isinstance(t, mi.UnionType):
        for member in t.types:
            member = _narrow(member, value)
            if isinstance(member, _RECORDS + (mi.NamedTupleType, mi.TypedDictType)) \
                    and isinstance(value, member.cls):
                return member
        for member in t.types:
            if _container_of(member, value):
                return member
    if isinstance(t, (mi.AnyType, mi.UnionType)) and is_record(value):
        return _type_info(type(value))
    return t


def _container_of(t: mi.Type, value: Any) -> bool:
    kinds = {mi.ListType: list, mi.SetType: set, mi.FrozenSetType: frozenset,
             mi.VarTupleType: tuple, mi.TupleType: tuple, mi.DictType: dict}
    kind = kinds.get(type(t))
    return kind is not None and isinstance(value, kind)


def is_record(value: Any) -> bool:
    return isinstance(value, msgspec.Struct) or (dataclasses.is_dataclass(value)
                                                 and not isinstance(value, type))


def _root_name(value: Any, t: mi.Type) -> str:
    if is_record(value) or isinstance(t, mi.AnyType):  # "Any[1]" would name no type
        return type(value).__name__
    return render_name(t)


def _parts(value: Any, t: mi.Type) -> Iterator[Tuple[str, Any, mi.Type]]:
    """(accessor, part, declared type) of each part msgspec encodes ``value`` from."""
    fields = {f.name: f.type for f in t.fields} if isinstance(
        t, _RECORDS + (mi.NamedTupleType, mi.TypedDictType)) else {}
    anything = mi.AnyType()
    if isinstance(value, msgspec.Struct):
        for name in value.__struct_fields__:
            yield f".{name}", getattr(value, name), fields.get(name, anything)
    elif is_record(value):
        for field in dataclasses.fields(value):
            yield f".{field.name}", getattr(value, field.name), fields.get(field.name, anything)
    elif isinstance(value, tuple) and hasattr(type(value), "_fields"):
        names: Tuple[str, ...] = type(value)._fields  # type: ignore[attr-defined]
        for name, item in zip(names, value):
            yield f".{name}", item, fields.get(name, anything)
    elif isinstance(value, dict):
        item_type = t.value_type if isinstance(t, mi.DictType) else anything
        for key, item in value.items():
            yield f"[{key!r:.40}]", item, fields.get(key, item_type)
    elif isinstance(value, (list, tuple, set, frozenset)):
        for i, item in enumerate(value):
            if isinstance(t, mi.TupleType):
                item_type = t.item_types[i] if i < len(t.item_types) else anything
            elif isinstance(t, (mi.ListType, mi.SetType, mi.FrozenSetType, mi.VarTupleType)):
                item_type = t.item_type
            else:
                item_type = anything
            yield f"[{i}]", item, item_type


def _got(value: Any) -> str:
    if type(value) is int:  # msgpack's ints end at 64 bits; the type alone reads as no fault
        return "an int beyond 64 bits"
    return type(value).__name__


SUPPORTED = "a Struct, a dataclass, builtins, numpy arrays"


def encode_failure(exc: BaseException, value: Any, schema: Any, name: str) -> str:
    """``exc``, raised encoding ``value`` as ``schema`` (shown as ``name``), as the text an error
    carries: ``"NotImplementedError: expected Plan.batch: int, got Unencodable: msgspec cannot
    encode it (...)"``. Failures that are not the encoder's (msgspec's validation, which names
    its path itself) keep their text."""
    detail = str(exc)
    unsupported = isinstance(exc, msgspec.EncodeError) or "is unsupported" in detail
    if unsupported or isinstance(exc, OverflowError):
        culprit = locate(value, schema)
        if culprit is not None:
            where, declared = f"{culprit.where}: {culprit.declared}", "the field"
            got = culprit.got
        else:
            where, declared, got = name, "the value", _got(value)
        if culprit is None and unsupported and _declares_nothing(schema, value):
            # The value's own type (no schema= given) or Any says nothing of what was expected:
            # "expected object, got object" read as no fault at all.
            return (f"{type(exc).__name__}: expected a value msgspec can encode ({SUPPORTED}), "
                    f"got {got}: msgspec cannot encode it ({detail}); make it a msgspec Struct "
                    f"or a dataclass, or convert it to one of those types before the call")
        detail = f"expected {where}, got {got}: msgspec cannot encode it ({detail})"
        if unsupported:
            detail += f"; give {declared} a type msgspec supports ({SUPPORTED})"
    return f"{type(exc).__name__}: {detail}"


def _declares_nothing(schema: Any, value: Any) -> bool:
    """Whether ``schema`` is only ``value``'s own class (the default without ``schema=``) or
    ``Any``: nothing the value was expected to be."""
    return schema is type(value) or isinstance(_type_info(schema), mi.AnyType)
