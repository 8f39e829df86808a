"""Self-describing values: what the drop-ins send where mpi4py and torch would pickle.

Ranks may contribute values of any supported type to one call (an idle rank's None beside its
peers' dicts), so every payload travels under the one schema ``Any`` and describes itself:

* A *plain* value (None, bool, str, bytes, float, 64-bit ints, and lists and dicts of these)
  is sent as it is: msgpack brings it back equal, and nothing walks it on either side.
* Anything else is sent as ``[ROOT, tree]``, where ``ROOT`` is a marker carrying flags and
  ``tree`` the value with every part msgpack alone would not bring back marked:

    tuple, set, frozenset      ``[marker, item, ...]``
    dict with other keys       ``[DICT, key, value, ...]`` (keys that are tuples of plain
                               values stay map keys: msgpack brings those back as tuples)
    a class instance           ``[CLASS, "module:qualname", fingerprint, payload]``: dataclasses,
                               msgspec Structs, NamedTuples, Enums, datetime, UUID, Decimal...;
                               the payload is the instance msgspec-encoded by its class, decoded
                               by the receiver's class of that name (found among modules it
                               already imported, never importing one) after the structural
                               fingerprints agree
    numpy array or scalar,     an extension value (``Ext``) holding its bytes
    complex, bytearray, an int
    beyond 64 bits
    a user's own ``Ext``       ``[EXT, code, data]``, so that no user value reads as a marker
    torch.dtype, torch.Size    extension values holding the dtype's name and the sizes (an
                               engine's tensor metadata: ``TensorMetadata(device, dtype,
                               size)``); decoded where torch is imported
    a namedtuple msgspec       ``[NAMED_TUPLE, "module:qualname", [field, ...], item, ...]``,
    cannot encode              its items tagged as a tuple's (torch dtypes and sizes in it)

Markers are msgpack extension values, which a plain value never contains, so a receiver tells
the two forms apart from the first bytes alone. Decoding is never pickle: a marker either names
a class this rank has and that has the sender's structure, or the value does not decode.

Finding a class depends on what the receiving rank imported, so values with classes set the
``HAS_CLASSES`` flag: the collectives then let every rank agree on whether every rank found
them (``compat.objects``).
"""

from __future__ import annotations

import struct
import sys
from typing import Any, Dict, List, Tuple

import msgspec.inspect as mi
import numpy as np
from msgspec.msgpack import Ext

from ..codecs import (KIND_MSGSPEC, decode_array, encode_array, find_class, nesting_ok,
                      resolve)
from ..codecs.nesting import MAX_NESTING
from ..codecs.culprit import locate
from ..codecs.schema import ENCODER, class_path
from ..core.fresh import on_fresh_stack
from ..core.identity import register_internal
from ..core.verdict import decode_any
from .fidelity import why_not

# Extension codes. Containers are lists whose first item is an empty marker; leaves carry data.
ROOT, TUPLE, SET, FROZENSET, DICT, CLASS, EXT, NAMED_TUPLE = 16, 17, 18, 19, 20, 21, 22, 23
ARRAY, NUMPY_SCALAR, COMPLEX, BIG_INT, BYTEARRAY, TORCH_DTYPE, TORCH_SIZE = 24, 25, 26, 27, 28, \
    29, 30
_CONTAINERS = {TUPLE: tuple, SET: set, FROZENSET: frozenset}
_NODES = frozenset((TUPLE, SET, FROZENSET, DICT, CLASS, EXT, NAMED_TUPLE))
_MARKERS = {code: Ext(code, b"") for code in _NODES}

HAS_CLASSES = 1  # this value holds class instances
CALL_HAS_CLASSES = 2  # some value of this call does (stamped on every part a rank scatters)

_MIN_INT, _MAX_INT = -2 ** 63, 2 ** 64 - 1
_COMPLEX = struct.Struct("<dd")
_SIZE = struct.Struct("<q")
# The msgpack bytes that start a tagged value: a 2-array, then a fixext1 with the ROOT code.
_TAGGED_PREFIX = bytes((0x92, 0xD4, ROOT))

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


class Unresolved(Exception):
    """A class marker this rank could not turn back into its class (what it imported decides)."""


# --- encoding ----------------------------------------------------------------------------------
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
            return Ext(COMPLEX, _COMPLEX.pack(value.real, value.imag))
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
            return Ext(TORCH_SIZE, b"".join(_SIZE.pack(int(n)) for n in value))
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
            raise Refused(f"ValueError: expected a {what} that arrives as it was sent, got one "
                          f"that would not: {why}; pickle would rebuild it, msgspec rebuilds "
                          f"declared fields by their declared types")
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


# --- decoding ----------------------------------------------------------------------------------
def flags_of(decoded: Any) -> int:
    """The flags of a decoded payload (0 for a plain value)."""
    if type(decoded) is list and len(decoded) == 2 and type(decoded[0]) is Ext \
            and decoded[0].code == ROOT:
        data = memoryview(decoded[0].data)
        return data[0] if len(data) else 0
    return 0


def flags_of_bytes(buf: Any) -> int:
    """The flags of an encoded payload, from its first bytes (no decoding)."""
    view = memoryview(buf)
    if len(view) >= 4 and bytes(view[:3]) == _TAGGED_PREFIX:
        return view[3]
    return 0


def flags_of_slots(recv: bytearray, slot: int, count: int, offset: int) -> int:
    """The OR of :func:`flags_of_bytes` over ``count`` slots of ``recv`` whose payloads start
    ``offset`` bytes in, each with its length in the 4 bytes before it (the exchange's slots):
    a scan a gather's non-root can afford at every call (no views, no decoding)."""
    flags = 0
    for start in range(offset, count * slot, slot):
        if recv[start:start + 3] == _TAGGED_PREFIX \
                and int.from_bytes(recv[start - 4:start], "little") >= 4:
            flags |= recv[start + 3]
    return flags


def any_tagged(trees: Any) -> bool:
    """Whether any of the decoded payloads needs :func:`decode` (most calls: none)."""
    for tree in trees:
        if type(tree) is list and len(tree) == 2 and type(tree[0]) is Ext:
            return True
    return False


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
        if x and type(x[0]) is Ext and x[0].code in _NODES:  # else a leaf (an array) comes first
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
        if len(data) != _COMPLEX.size:
            raise ValueError(f"expected {_COMPLEX.size} bytes of a complex, got {len(data)}")
        return complex(*_COMPLEX.unpack(data))
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
        if len(data) % _SIZE.size:
            raise ValueError(f"expected a torch.Size of 8-byte ints, got {len(data)} bytes")
        return torch.Size(n for (n,) in _SIZE.iter_unpack(data))
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
