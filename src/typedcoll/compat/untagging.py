"""Decoding a self-describing value (``compat.values`` describes it) back into what it stands
for: never pickle; a class marker names a class this rank already has, of the sender's
structure, or the value does not decode.
"""

from __future__ import annotations

import sys
from typing import Any, Dict

from msgspec.msgpack import Ext

from ..codecs import decode_array, find_class, nesting_ok, resolve
from ..codecs.nesting import MAX_NESTING
from ..core.fresh import on_fresh_stack
from ..core.plumbing import register_internal
from ..core.verdict import decode_any
from .markers import (ARRAY, BIG_INT, BYTEARRAY, CLASS, COMPLEX, COMPLEX_PAIR, DICT, EXT,
                      FROZENSET, NAMED_TUPLE, NODES, NUMPY_SCALAR, ROOT, SET, SIZE_ITEM,
                      TORCH_DTYPE, TORCH_SIZE, TUPLE)

_CONTAINERS = {TUPLE: tuple, SET: set, FROZENSET: frozenset}


class Unresolved(Exception):
    """A class marker this rank could not turn back into its class (what it imported decides)."""


def decode(decoded: Any) -> Any:
    """The value a payload decoded under ``Any`` stands for.

    Raises :class:`Unresolved` for a class this rank does not have (or has in another shape),
    ValueError for anything malformed (both the same on every rank that sees the same bytes,
    apart from what each imported).
    """
    if not (type(decoded) is list and len(decoded) == 2 and type(decoded[0]) is Ext
            and decoded[0].code == ROOT):
        return decoded
    try:
        return _untag(decoded[1], 0)
    except RecursionError:
        # Bounded by the payload's checked nesting: only a caller deep in its own stack can
        # hit the limit, and the verdict must not depend on that.
        return on_fresh_stack(_untag, decoded[1], 0)


def _untag(x: Any, depth: int) -> Any:
    t = type(x)
    if t is list or t is tuple:
        if x and type(x[0]) is Ext and x[0].code in NODES:  # else a leaf (an array) comes first
            return _node(x, depth)
        if t is tuple:  # a map key: msgpack arrays in keys come back as tuples
            return tuple(_untag(item, depth + 1) for item in x)
        for i, item in enumerate(x):
            ti = type(item)
            if ti is list or ti is dict or ti is Ext or ti is tuple:
                x[i] = _untag(item, depth + 1)
        return x
    if t is dict:
        for k, item in x.items():
            ti = type(item)
            if ti is list or ti is dict or ti is Ext or ti is tuple:
                x[k] = _untag(item, depth + 1)
        return x
    if t is Ext:
        return _leaf(x)
    return x


def _node(x: Any, depth: int) -> Any:
    code = x[0].code
    items = x[1:]
    if code in _CONTAINERS:
        return _CONTAINERS[code](_untag(item, depth + 1) for item in items)
    if code == DICT:
        if len(items) % 2:
            raise ValueError("expected key, value pairs in a dict marker, got an odd count")
        return {_untag(items[i], depth + 1): _untag(items[i + 1], depth + 1)
                for i in range(0, len(items), 2)}
    if code == CLASS:
        return _instance(items)
    if code == NAMED_TUPLE:
        return _named_tuple(items, depth)
    if code == EXT:
        if len(items) != 2 or type(items[0]) is not int or type(items[1]) is not bytes:
            raise ValueError("expected [code, data] after an Ext marker")
        return Ext(items[0], items[1])
    raise ValueError(f"expected a container marker, got extension code {code}")


def _leaf(ext: Ext) -> Any:
    code, data = ext.code, bytes(ext.data)
    if code == ARRAY:
        return decode_array(data)
    if code == NUMPY_SCALAR:
        return decode_array(data)[()]
    if code == COMPLEX:
        if len(data) != COMPLEX_PAIR.size:
            raise ValueError(f"expected {COMPLEX_PAIR.size} bytes of a complex, got {len(data)}")
        return complex(*COMPLEX_PAIR.unpack(data))
    if code == BIG_INT:
        return int(bytes(data).decode("ascii"))
    if code == BYTEARRAY:
        return bytearray(data)
    if code == TORCH_DTYPE or code == TORCH_SIZE:
        return _torch_leaf(code, data)
    raise ValueError(f"expected a value marker, got extension code {code}")


def _torch_leaf(code: int, data: bytes) -> Any:
    torch = sys.modules.get("torch")  # never imported here: a rank without torch cannot use one
    if torch is None:
        raise Unresolved("expected torch to be imported on this rank, as on the sender's, to "
                         "rebuild a torch.dtype or torch.Size")
    if code == TORCH_SIZE:
        if len(data) % SIZE_ITEM.size:
            raise ValueError(f"expected a torch.Size of 8-byte ints, got {len(data)} bytes")
        return torch.Size(n for (n,) in SIZE_ITEM.iter_unpack(data))
    name = data.decode("ascii", errors="replace")
    dtype = _torch_dtypes(torch).get(name)
    if dtype is None:
        raise Unresolved(f"expected a torch dtype this rank's torch has, got {name!r}")
    return dtype


_DTYPES: Dict[str, Any] = {}


def _torch_dtypes(torch: Any) -> Dict[str, Any]:
    """``str(dtype)`` -> dtype, from the module's own names: looking a wire name up with
    ``getattr`` would run torch's lazy imports for any name a payload holds."""
    if not _DTYPES:
        _DTYPES.update((str(v), v) for v in list(vars(torch).values())
                       if isinstance(v, torch.dtype))
    return _DTYPES


def _named_tuple(items: Any, depth: int) -> Any:
    if len(items) < 2 or type(items[0]) is not str or type(items[1]) is not list \
            or any(type(f) is not str for f in items[1]):
        raise ValueError("expected a class path and field names after a namedtuple marker")
    path, names = items[0], tuple(items[1])
    items = [path] + items[2:]
    try:
        cls = find_class(items[0])
    except (LookupError, TypeError) as exc:
        raise Unresolved(str(exc)) from None
    fields = getattr(cls, "_fields", None)
    if not (isinstance(cls, type) and issubclass(cls, tuple) and isinstance(fields, tuple)):
        raise Unresolved(f"expected {items[0]} to be a namedtuple on this rank, as on the "
                         f"sender's")
    if fields != names or len(names) != len(items) - 1:
        raise Unresolved(f"expected {path} with the sender's fields {list(names)}, got "
                         f"{list(fields)} on this rank (the ranks run different versions of it)")
    return cls(*(_untag(item, depth + 1) for item in items[1:]))


def _instance(items: Any) -> Any:
    if len(items) != 3 or type(items[0]) is not str or type(items[1]) is not bytes \
            or type(items[2]) is not bytes:
        raise ValueError("expected [path, fingerprint, payload] after a class marker")
    path, fingerprint, payload = items
    try:
        info = resolve(find_class(path))
    except (LookupError, TypeError) as exc:
        raise Unresolved(str(exc)) from None
    if info.fingerprint != fingerprint:
        raise Unresolved(f"expected {path} with the sender's structure ({fingerprint.hex()[:8]}), "
                         f"got a class of another structure ({info.fingerprint.hex()[:8]}) on "
                         f"this rank (the ranks run different versions of it)")
    if len(payload) > MAX_NESTING and not nesting_ok(payload):
        raise ValueError(f"expected a {path} nested at most {MAX_NESTING} deep, got one nested "
                         f"deeper")
    try:
        return decode_any(info, payload)
    except Exception as exc:  # a payload of the right structure that its class rejects
        raise Unresolved(f"expected a valid {info.name}, got one its class rejects: "
                         f"{type(exc).__name__}: {exc}") from None


register_internal(__file__)
