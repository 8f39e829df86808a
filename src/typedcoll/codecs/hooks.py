"""User code that decoding runs: the hooks a schema's classes define.

msgspec builds a Struct or dataclass and then calls its ``__post_init__`` (for attrs classes,
``__attrs_pre_init__``, ``__attrs_post_init__`` and field validators). Everything else it does
is a function of the bytes and the schema, the same on every rank; a hook may also read
rank-local state, so the same payload can decode on one rank and be refused on another. The
protocol settles decoding for such schemas (``core/settle.py``): it must know which ones they
are. A class whose hooks decide from its fields alone can say so (:func:`decides_from_fields`):
its hooks then count as none, and its calls keep the C path's steady state and skip the
settle.
"""

from __future__ import annotations

from typing import Any, List, Optional, Tuple, TypeVar

import msgspec.inspect as mi

RECORDS = (mi.StructType, mi.DataclassType, mi.TypedDictType, mi.NamedTupleType)
_HOOKS = ("__post_init__", "__attrs_pre_init__", "__attrs_post_init__")
_DECLARED = "__typedcoll_decides_from_fields__"

T = TypeVar("T", bound=type)


def decides_from_fields(cls: T) -> T:
    """Declare, as a class decorator, that the hooks decoding runs on ``cls`` (its
    ``__post_init__``, attrs validators) decide from its fields alone, the same on every rank.

    Calls whose schema holds such a class otherwise end with one more exchange that settles
    their decoding (a hook that reads rank-local state could refuse on one rank what the others
    accept), both on the Python steps after the C fast path's exchange; declared, they skip
    both. The declaration covers the hooks ``cls`` defines or inherits; a subclass that defines
    a hook of its own is not covered. Declare before the class's first collective (a schema is
    resolved once). A declared hook that does read rank-local state splits the verdict again:
    the rank it refuses raises ``DecodeError`` while the others return.
    """
    setattr(cls, _DECLARED, True)
    return cls


def nested_types(t: mi.Type) -> Optional[List[mi.Type]]:
    """The types ``t`` holds directly (what it annotates, a union's members, a container's
    items, a record's fields); None for a type that holds none. The one walk of a schema's
    tree, for its hooks here and its depth in ``schema``."""
    if isinstance(t, mi.Metadata):
        return [t.type]
    if isinstance(t, mi.UnionType):
        return list(t.types)
    if isinstance(t, (mi.ListType, mi.SetType, mi.FrozenSetType, mi.VarTupleType)):
        return [t.item_type]
    if isinstance(t, mi.TupleType):
        return list(t.item_types)
    if isinstance(t, mi.DictType):
        return [t.key_type, t.value_type]
    if isinstance(t, RECORDS):
        return [f.type for f in t.fields]
    return None


def decoding_hook(t: mi.Type, _seen: Tuple[int, ...] = ()) -> Optional[str]:
    """The first hook decoding ``t`` may run, as ``Class.__post_init__``; None where it runs
    none (its result then depends on the bytes alone)."""
    if isinstance(t, RECORDS):
        if id(t) in _seen:  # a recursive type: its hooks were looked for where it began
            return None
        own = _own_hook(t.cls) if isinstance(t, (mi.StructType, mi.DataclassType)) else None
        if own is not None:
            return own
        _seen += (id(t),)
    for inner in nested_types(t) or ():
        found = decoding_hook(inner, _seen)
        if found is not None:
            return found
    return None


def _own_hook(cls: type) -> Optional[str]:
    for name in _HOOKS:
        if getattr(cls, name, None) is not None and not _declared(cls, name):
            return f"{cls.__name__}.{name}"
    fields = getattr(cls, "__attrs_attrs__", ())
    if any(getattr(f, "validator", None) is not None for f in fields) and \
            not _declared(cls, "__attrs_attrs__"):
        return f"{cls.__name__}'s attrs validators"
    return None


def _declared(cls: type, name: str) -> bool:
    """A class that declared it decides from its fields (``decides_from_fields``), ``cls`` or a
    base of it, runs the same ``name`` as ``cls`` does (it defines or inherits it: a base
    declared beside a mixin that defines the hook does not cover the mixin's)."""
    owner = _definer(cls, name)
    return any(vars(c).get(_DECLARED) and _definer(c, name) is owner for c in cls.__mro__)


def _definer(cls: type, name: str) -> Any:
    return next((c for c in cls.__mro__ if name in vars(c)), None)
