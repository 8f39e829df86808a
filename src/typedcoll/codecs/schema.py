"""Schemas: what a collective's payload is, its name and structural fingerprint, and its codec.

A schema is any type msgspec can decode, or ``numpy.ndarray`` (and numpy scalar types, for
``allreduce``). Each schema is resolved once into a :class:`SchemaInfo` holding its display name,
an 8-byte fingerprint and a reusable decoder; later calls hit a dict.

The fingerprint hashes msgspec's structural type information (field names, wire names, types,
defaults presence, the defaults a receiver fills in for fields a sender may leave out, tags,
array_like), so two versions of a same-named Struct differ while the same Struct defined in two
processes agrees. Python's ``hash`` is salted per process, so blake2b.
"""

from __future__ import annotations

import sys
from typing import Any, Dict, List, Optional, Tuple

import msgspec
import msgspec.inspect as mi
import numpy as np

from .int_list import faster_decode
from .digest import digest8
from .hooks import RECORDS, decoding_hook, nested_types
from .nesting import MAX_NESTING
from .records import fits_class, is_record_class, nested_check

from .array import decode_array, encode_array

FINGERPRINT_SIZE = 8
NO_FINGERPRINT = bytes(FINGERPRINT_SIZE)

KIND_MSGSPEC = 0
KIND_ARRAY = 1  # numpy.ndarray: raw bytes, dtype and shape in a small prefix
KIND_NUMPY_SCALAR = 2  # a numpy scalar type: travels as a 0-d array, comes back as the scalar

# msgpack extension code of a numpy array inside a msgspec payload (a Struct's ndarray field).
ARRAY_EXT = 1


def _enc_hook(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        return msgspec.msgpack.Ext(ARRAY_EXT, encode_array(obj))
    if isinstance(obj, np.generic):
        return obj.item()  # a numpy scalar inside a container travels as the Python number
    raise NotImplementedError(f"Encoding objects of type {type(obj).__name__} is unsupported")


def _dec_hook(tp: Any, obj: Any) -> Any:
    if tp is np.ndarray and isinstance(obj, msgspec.msgpack.Ext) and obj.code == ARRAY_EXT:
        return decode_array(obj.data)
    raise NotImplementedError(f"expected {getattr(tp, '__name__', tp)}")


# The msgpack encoder is stateless apart from its internal buffer: one serves every schema.
ENCODER = msgspec.msgpack.Encoder(enc_hook=_enc_hook)


class SchemaInfo:
    """A resolved schema: display name, fingerprint and decoder, built once per schema.

    ``path`` is how a receiver that named no schema finds the class: ``module:qualname`` (empty
    for schemas that are not classes, such as ``Optional[T]``).
    """

    __slots__ = ("schema", "name", "fingerprint", "kind", "decoder", "decode", "path",
                 "path_prefix", "record_class", "needs_nesting_scan", "hook", "fast")

    def __init__(self, schema: Any, name: str, fingerprint: bytes, kind: int,
                 decoder: Any, decode: Any = None, batch: bool = True) -> None:
        self.schema = schema
        self.name = name
        self.fingerprint = fingerprint
        self.kind = kind
        self.decoder = decoder
        # What decodes one payload: ``decoder.decode``, or a faster twin that gives its results.
        self.decode: Any = decode if decode is not None else getattr(decoder, "decode", None)
        self.path = class_path(schema)
        # How a rooted payload names its class for receivers that named no schema: len, path.
        encoded = self.path.encode()[:255]
        self.path_prefix = bytes((len(encoded),)) + encoded
        # A record class (Struct, dataclass, Enum) whose values must be instances of it: the
        # sender says "expected RankState, got dict" before any peer decodes anything.
        self.record_class = schema if kind == KIND_MSGSPEC and is_record_class(schema) else None
        # Records inside the schema (Optional[RankState], list[RankState], a record's field):
        # a class whose isinstance walks the value, so both paths test it as they test a bare
        # record class.
        check = nested_check(schema) if kind == KIND_MSGSPEC else None
        if check is not None:
            self.record_class = fits_class(check, name)
        # msgspec recurses no deeper than a schema's own structure, whatever the payload: only
        # schemas that can nest without bound (Any, Raw, recursive types) need the nesting scan.
        self.needs_nesting_scan = True
        # User code decoding runs (``Class.__post_init__``), which the protocol settles after
        # decoding (``codecs.hooks``); None where the bytes alone decide.
        self.hook: Optional[str] = None
        # What the C fast path needs, in one attribute read; with a decoder of a list of this
        # schema, which decodes every rank's payload of an allgather in one call (None where
        # values may point into their bytes: they are decoded one by one from private copies;
        # and where not ``batch``: one by one with ``decode``).
        list_decode = None
        if kind == KIND_MSGSPEC and isinstance(decoder, msgspec.msgpack.Decoder) and batch:
            list_decode = msgspec.msgpack.Decoder(List[schema], dec_hook=_dec_hook).decode
        self.fast = ((fingerprint, self.decode, self.record_class, self.path_prefix,
                      list_decode, False) if kind == KIND_MSGSPEC and decoder else None)

    def __repr__(self) -> str:
        return f"SchemaInfo({self.name}, {self.fingerprint.hex()})"


def class_path(schema: Any) -> str:
    """``module:qualname`` of a class schema that can be found again by name, else ""."""
    if not isinstance(schema, type) or "<locals>" in schema.__qualname__:
        return ""
    return f"{schema.__module__}:{schema.__qualname__}"


def find_class(path: str) -> Any:
    """The class at ``module:qualname`` among modules already imported (never imports one).

    Raises LookupError naming what is missing.
    """
    if path == "builtins:NoneType":
        return type(None)
    module_name, _, qualname = path.partition(":")
    module = sys.modules.get(module_name)
    if module is None or not qualname:
        raise LookupError(f"expected the class {path} in an imported module, got no module "
                          f"{module_name!r} (import it on this rank, or pass schema=)")
    target: Any = module
    for part in qualname.split("."):
        target = getattr(target, part, None)
        if target is None:
            raise LookupError(f"expected the class {path}, got no {qualname!r} in module "
                              f"{module_name!r} (pass schema=)")
    return target


_CACHE: Dict[Any, SchemaInfo] = {}
_BY_ID: Dict[int, Tuple[Any, SchemaInfo]] = {}


def resolve(schema: Any) -> SchemaInfo:
    """The SchemaInfo of ``schema``; raises TypeError naming the schema when it is unsupported."""
    try:
        return _CACHE[schema]
    except KeyError:
        pass
    except TypeError:  # an unhashable annotation: resolve it every time (rare, still correct)
        return _build(schema)
    info = _build(schema)
    _CACHE[schema] = info
    # Keyed by identity too: typing objects such as Optional[RankState] hash in Python code
    # (~1 us a lookup), and the C fast path looks up the schema on every collective. The entry
    # holds the schema itself, so its id cannot be reused while the entry exists.
    _BY_ID[id(schema)] = (schema, info)
    return info


def _build(schema: Any) -> SchemaInfo:
    if schema is np.ndarray:
        return SchemaInfo(schema, "ndarray", digest8("ndarray"), KIND_ARRAY, None)
    if isinstance(schema, type) and issubclass(schema, np.generic):
        name = np.dtype(schema).name
        return SchemaInfo(schema, name, digest8("numpy:" + np.dtype(schema).str), KIND_NUMPY_SCALAR,
                          None)
    try:
        type_info = mi.type_info(schema)
        decoder: Any = msgspec.msgpack.Decoder(schema, dec_hook=_dec_hook)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"expected a schema msgspec can decode or numpy.ndarray, got {schema!r}: "
                        f"{exc}") from exc
    structure = canonical(type_info)
    if "RawType(" in structure or "MemoryViewType(" in structure:
        decoder = _CopyingDecoder(decoder)
    faster = faster_decode(type_info, decoder.decode)
    # One msgspec call for every rank's payload beats a faster decoder called per payload,
    # except for lists of ints, whose cost is their items; ``Any`` payloads are mostly records.
    batch = faster is None or isinstance(type_info, mi.AnyType)
    info = SchemaInfo(schema, render_name(type_info), digest8(structure), KIND_MSGSPEC, decoder,
                      faster, batch)
    depth = static_depth(type_info)
    info.needs_nesting_scan = depth is None or depth >= MAX_NESTING
    info.hook = decoding_hook(type_info)
    if info.hook is not None and info.fast is not None:
        # The C path sends such a call and exchanges it; the flag it writes for the hook hands
        # the rest to the Python steps, which decode and settle what the hook decides.
        info.fast = info.fast[:5] + (True,)
    return info


def static_depth(t: mi.Type, _seen: Tuple[int, ...] = ()) -> Any:
    """How deep msgspec can nest decoding ``t``; None where nothing bounds it (Any, Raw, a
    recursive type)."""
    if isinstance(t, (mi.AnyType, mi.RawType)):
        return None
    if isinstance(t, mi.CustomType):
        return 1 if t.cls is np.ndarray else None
    if isinstance(t, RECORDS):
        if id(t) in _seen:
            return None
        _seen += (id(t),)
    inner = nested_types(t)
    if inner is None:
        return 1
    # An annotation or a union is no container of its own: it nests as deep as its members.
    own = 0 if isinstance(t, (mi.Metadata, mi.UnionType)) else 1
    return _deepest([static_depth(x, _seen) for x in inner], own)


def _deepest(depths: List[Any], own: int) -> Any:
    return None if None in depths else own + max(depths, default=0)


class _CopyingDecoder:
    """The decoder of a schema whose values may point into the bytes they were decoded from
    (``msgspec.Raw``, ``memoryview``): it decodes from a private copy, because payloads arrive
    in a receive buffer that the next collective overwrites or reallocates."""

    __slots__ = ("inner",)

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def decode(self, buf: Any) -> Any:
        return self.inner.decode(bytes(buf))


def render_name(t: mi.Type) -> str:
    """A short, readable name: ``RankState``, ``Optional[RankState]``, ``list[int]``."""
    if isinstance(t, (mi.StructType, mi.DataclassType, mi.TypedDictType, mi.NamedTupleType,
                      mi.EnumType)):
        return t.cls.__name__
    if isinstance(t, mi.UnionType):
        others = [x for x in t.types if not isinstance(x, mi.NoneType)]
        if len(others) == 1 and len(others) < len(t.types):
            return f"Optional[{render_name(others[0])}]"
        return " | ".join(render_name(x) for x in t.types)
    if isinstance(t, (mi.ListType, mi.SetType, mi.FrozenSetType, mi.VarTupleType)):
        container = {mi.ListType: "list", mi.SetType: "set", mi.FrozenSetType: "frozenset",
                     mi.VarTupleType: "tuple"}[type(t)]
        suffix = ", ..." if isinstance(t, mi.VarTupleType) else ""
        return f"{container}[{render_name(t.item_type)}{suffix}]"
    if isinstance(t, mi.TupleType):
        return f"tuple[{', '.join(render_name(x) for x in t.item_types)}]"
    if isinstance(t, mi.DictType):
        return f"dict[{render_name(t.key_type)}, {render_name(t.value_type)}]"
    if isinstance(t, mi.LiteralType):
        return f"Literal[{', '.join(repr(v) for v in t.values)}]"
    if isinstance(t, mi.NoneType):
        return "None"
    if isinstance(t, mi.Metadata):
        return render_name(t.type)
    if isinstance(t, mi.CustomType):
        return t.cls.__name__
    if isinstance(t, mi.AnyType):
        return "Any"
    return type(t).__name__.removesuffix("Type").lower()


def canonical(t: mi.Type, _seen: Tuple[int, ...] = ()) -> str:
    """A deterministic structural description of ``t``; recursive types refer back by depth."""
    if isinstance(t, (mi.StructType, mi.DataclassType, mi.TypedDictType, mi.NamedTupleType)):
        if id(t) in _seen:
            return f"<ref {_seen.index(id(t))}>"
        seen = _seen + (id(t),)
        omits = isinstance(t, mi.StructType) and t.cls.__struct_config__.omit_defaults
        fields = ",".join(
            f"{f.name}/{f.encode_name}{'!' if f.required else '?'}{_default(f, omits)}:"
            f"{canonical(f.type, seen)}" for f in t.fields)
        extra = ""
        if isinstance(t, mi.StructType):
            extra = f"|tag={t.tag_field}={t.tag!r}|array_like={t.array_like}"
        return f"{type(t).__name__}({t.cls.__qualname__}{extra}|{fields})"
    if isinstance(t, mi.UnionType):
        # msgspec tells a union's members apart by their wire types, whatever order they are
        # written in: Union[A, B] on one rank and Union[B, A] on another decode alike.
        return "Union(" + ",".join(sorted(canonical(x, _seen) for x in t.types)) + ")"
    if isinstance(t, mi.EnumType):
        # The wire holds a member's value and the receiver maps it to a member: two versions
        # agree where every name maps to the same value, whatever order they list them in.
        members = sorted(f"{m.name}={m.value!r}" for m in t.cls)
        return f"Enum({t.cls.__qualname__}|{','.join(members)})"
    parts = []
    for slot in getattr(type(t), "__struct_fields__", ()):  # every mi.Type is a msgspec Struct
        value = getattr(t, slot)
        if isinstance(value, mi.Type):
            value = canonical(value, _seen)
        elif isinstance(value, tuple) and value and isinstance(value[0], mi.Type):
            value = "(" + ",".join(canonical(x, _seen) for x in value) + ")"
        elif isinstance(value, type):
            value = value.__qualname__
        else:
            value = repr(value)
        parts.append(f"{slot}={value}")
    return f"{type(t).__name__}({','.join(parts)})"


def _default(field: mi.Field, omits: bool) -> str:
    """A field's default where it decides what a receiver decodes: a sender leaves the field
    out when its value is unset (a default of ``UNSET``, which msgspec's inspection shows as no
    default) or, with ``omit_defaults``, equal to the default, and the receiver then fills in
    its own. Two versions whose defaults differ there decode one message to two values, so they
    must not agree; elsewhere every value is sent and a default changes nothing. A factory is
    never called: msgspec leaves a factory's field out only for the empty builtin collections,
    and any other factory's field is always sent."""
    unset = field.default is msgspec.NODEFAULT and field.default_factory is msgspec.NODEFAULT
    if field.required or not (omits or unset):
        return ""
    if unset:
        return "=UNSET"
    factory = field.default_factory
    if factory is not msgspec.NODEFAULT:
        return f"={factory.__name__}()" if factory in _OMITTED_FACTORIES else ""
    try:
        return "=" + msgspec.msgpack.encode(field.default, order="deterministic").hex()
    except (TypeError, ValueError):  # never sent as it is: its type names it, not its repr
        return f"=<{type(field.default).__qualname__}>"


_OMITTED_FACTORIES = (list, dict, set, frozenset)
