"""Encoding a value into its self-describing form (``compat.values`` describes it).

A plain value goes as it is; anything else is walked once (``_Tagger``), every part msgpack
alone would not bring back marked, and every class instance checked to arrive as it was sent.
"""

from __future__ import annotations

import sys
from typing import Any, Dict, List, Tuple

import msgspec.inspect as mi
import numpy as np
from msgspec.msgpack import Ext

from ..codecs import KIND_MSGSPEC, encode_array, find_class, nesting_ok, resolve
from ..codecs.nesting import MAX_NESTING
from ..codecs.culprit import is_record, locate
from ..codecs.schema import ENCODER, class_path
from ..core.fresh import on_fresh_stack
from ..core.plumbing import register_internal
from .fidelity import why_not
from .markers import (ARRAY, BIG_INT, BYTEARRAY, CLASS, COMPLEX, COMPLEX_PAIR, DICT, EXT,
                      FROZENSET, HAS_CLASSES, NAMED_TUPLE, NODES, NUMPY_SCALAR, ROOT, SET,
                      SIZE_ITEM, TORCH_DTYPE, TORCH_SIZE, TUPLE)

_MARKERS = {code: Ext(code, b"") for code in NODES}

_MIN_INT, _MAX_INT = -2 ** 63, 2 ** 64 - 1

SUPPORTED = ("builtins, dataclasses, msgspec Structs, NamedTuple, TypedDict, Enum, numpy "
             "arrays and scalars")


class Refused(Exception):
    """A value the drop-ins cannot send without pickle; ``str()`` is the whole explanation."""

    def __init__(self, what: str, path: str = "") -> None:
        super().__init__(what)
        self.what = what
        self.path = path

    def text(self) -> str:
        return self.what.replace("{path}", "$" + self.path)


def _plain_scalar(x: Any) -> bool:
    t = type(x)
    if t is str or t is float or t is bool or x is None or t is bytes:
        return True
    return t is int and _MIN_INT <= x <= _MAX_INT


def is_plain(value: Any, depth: int) -> bool:
    """Whether msgpack alone brings ``value`` back equal (and of the same types).

    On every call's path: the common leaves are tested inline, without a call per item.
    """
    t = type(value)
    if t is str or t is float or t is bool or value is None or t is bytes:
        return True
    if t is int:
        return _MIN_INT <= value <= _MAX_INT  # type: ignore[no-any-return]
    if depth >= MAX_NESTING:
        return False
    if t is dict:
        for k, x in value.items():
            tk = type(k)
            if not (tk is str or (tk is int and _MIN_INT <= k <= _MAX_INT) or tk is float
                    or tk is bool or k is None or tk is bytes):
                return False
            tx = type(x)
            if tx is str or tx is float or tx is bool or x is None:
                continue
            if tx is int:
                if _MIN_INT <= x <= _MAX_INT:
                    continue
                return False
            if not is_plain(x, depth + 1):
                return False
        return True
    if t is list:
        for x in value:
            tx = type(x)
            if tx is str or tx is float or tx is bool or x is None:
                continue
            if tx is int:
                if _MIN_INT <= x <= _MAX_INT:
                    continue
                return False
            if not is_plain(x, depth + 1):
                return False
        return True
    return False


def _native_key(key: Any) -> bool:
    """Keys msgpack brings back equal: plain scalars, and tuples of native keys."""
    if type(key) is tuple:
        return all(_native_key(k) for k in key)
    return _plain_scalar(key)


class _Tagger:
    __slots__ = ("flags",)

    def __init__(self) -> None:
        self.flags = 0

    def tag(self, value: Any, depth: int) -> Any:
        if _plain_scalar(value):
            return value
        if depth >= MAX_NESTING:
            raise Refused(f"ValueError: expected a value nested at most {MAX_NESTING} deep, got "
                          f"one nested deeper at {{path}}")
        t = type(value)
        if t is list:
            return [self._item(x, depth, i) for i, x in enumerate(value)]
        if t is dict:
            return self._dict(value, depth)
        if t is tuple:
            return [_MARKERS[TUPLE]] + [self._item(x, depth, i) for i, x in enumerate(value)]
        if t is set or t is frozenset:
            marker = _MARKERS[SET if t is set else FROZENSET]
            return [marker] + [self._item(x, depth, i) for i, x in enumerate(value)]
        if t is int:
            return self._big_int(value)
        if t is complex:
            return Ext(COMPLEX, COMPLEX_PAIR.pack(value.real, value.imag))
        if t is bytearray:
            return Ext(BYTEARRAY, bytes(value))
        if t is np.ndarray:
            return Ext(ARRAY, _array_bytes(value))
        if isinstance(value, np.generic):
            return Ext(NUMPY_SCALAR, _array_bytes(np.asarray(value)))
        if t is Ext:
            return [_MARKERS[EXT], value.code, value.data]
        if t.__module__ == "torch" and t.__name__ in ("dtype", "Size"):
            # Decoded by the receiver's torch, which may lack a dtype or not be imported: the
            # ranks settle together whether every rank decoded, as for classes.
            self.flags |= HAS_CLASSES
            if t.__name__ == "dtype":
                return Ext(TORCH_DTYPE, str(value).encode())
            return Ext(TORCH_SIZE, b"".join(SIZE_ITEM.pack(int(n)) for n in value))
        return self._instance(value, depth)

    def _item(self, x: Any, depth: int, where: Any) -> Any:
        try:
            return self.tag(x, depth + 1)
        except Refused as exc:
            exc.path = f"[{where!r}]" + exc.path
            raise

    def _dict(self, value: Dict[Any, Any], depth: int) -> Any:
        if all(_native_key(k) for k in value):
            return {k: self._item(x, depth, k) for k, x in value.items()}
        out: List[Any] = [_MARKERS[DICT]]
        for k, x in value.items():
            out.append(self._item(k, depth, "<key>"))
            out.append(self._item(x, depth, k))
        return out

    def _big_int(self, value: int) -> Ext:
        try:
            return Ext(BIG_INT, str(value).encode())
        except ValueError as exc:  # beyond the interpreter's digit limit
            raise Refused(f"ValueError: expected an int of at most {sys.get_int_max_str_digits()} "
                          f"digits, got a larger one at {{path}}: {exc}") from exc

    def _instance(self, value: Any, depth: int) -> Any:
        cls = type(value)
        what = cls.__name__
        info = _class_info(cls)
        if info is None:
            raise Refused(f"TypeError: expected a value the drop-ins can send without pickle "
                          f"({SUPPORTED}), got {what} at {{path}}: make it a msgspec Struct or "
                          f"a dataclass, or convert it to one of those before the call")
        path = class_path(cls)
        found = None
        if path:
            try:
                found = find_class(path)
            except LookupError:
                pass
        if found is not cls:
            where = "defined inside a function" if "<locals>" in cls.__qualname__ else \
                f"not reachable as {cls.__module__}:{cls.__qualname__}"
            raise Refused(f"TypeError: expected a class receivers can find by module and name, "
                          f"got {what} at {{path}}, {where}; define it at module level")
        try:
            payload = ENCODER.encode(value)
        except Exception as exc:  # whatever msgspec or a field's type raises
            if isinstance(value, tuple) and hasattr(cls, "_fields"):
                # A namedtuple of what only this module tags (torch dtypes and sizes): its items
                # tagged one by one, rebuilt by the receiver's class of that name.
                self.flags |= HAS_CLASSES
                return [_MARKERS[NAMED_TUPLE], path, list(cls._fields)] + [
                    self._item(x, depth, i) for i, x in enumerate(value)]
            culprit = locate(value, cls, "{path}")
            at = "one it cannot at {path}" if culprit is None else \
                f"{culprit.got} at {culprit.where}, declared {culprit.declared}"
            raise Refused(f"TypeError: expected a {what} whose fields msgspec can encode, got "
                          f"{at} ({exc}); give its fields types from {SUPPORTED}") from None
        if len(payload) > MAX_NESTING and not nesting_ok(payload):
            raise Refused(f"ValueError: expected a value nested at most {MAX_NESTING} deep, got "
                          f"a {what} nested deeper at {{path}}")
        try:
            why = why_not(value, info.decode(payload), "{path}")
        except Exception as exc:  # a __post_init__ that refuses what it built
            why = f"{{path}} would not decode as a {what} ({type(exc).__name__}: {exc})"
        if why is not None:
            # what records lose (a subclass, a rewritten field); a plain value says its own why
            rebuilt = ("; pickle would rebuild it, msgspec rebuilds declared fields by their "
                       "declared types") if is_record(value) else ""
            raise Refused(f"ValueError: expected a {what} that arrives as it was sent, got one "
                          f"that would not: {why}{rebuilt}")
        self.flags |= HAS_CLASSES
        return [_MARKERS[CLASS], path, info.fingerprint, payload]


def _class_info(cls: type) -> Any:
    """The class's schema, where msgspec knows how to rebuild it (not an arbitrary class)."""
    info = _CLASS_INFO.get(cls)
    if info is None and cls not in _CLASS_INFO:
        try:
            known = not isinstance(mi.type_info(cls), mi.CustomType)
            info = resolve(cls) if known else None
        except (TypeError, ValueError):
            info = None
        if info is not None and info.kind != KIND_MSGSPEC:
            info = None
        _CLASS_INFO[cls] = info
    return info


_CLASS_INFO: Dict[type, Any] = {}


def _array_bytes(array: np.ndarray) -> bytes:
    if array.dtype.hasobject or array.dtype.fields is not None:
        raise Refused(f"TypeError: expected a numpy array of plain numbers, got dtype "
                      f"{array.dtype} at {{path}}; convert it before the call")
    return encode_array(array)


def encode(value: Any, flags: int = 0) -> Tuple[Any, int]:
    """(what to send under the schema ``Any``, its flags). Raises :class:`Refused`.

    ``flags`` are added to the value's own (``CALL_HAS_CLASSES``); a plain value with added
    flags is wrapped like any other, so that receivers can read them.
    """
    try:
        if not flags and is_plain(value, 0):
            return value, 0
    except RecursionError:  # deep in this rank's stack: the tagger decides on a fresh one
        pass
    tagger = _Tagger()
    try:
        tree = tagger.tag(value, 0)
    except RecursionError:  # deep in this rank's stack, not in the value
        tree = on_fresh_stack(tagger.tag, value, 0)
    flags |= tagger.flags
    return [Ext(ROOT, bytes((flags,))), tree], flags


register_internal(__file__)
