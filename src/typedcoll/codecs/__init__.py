"""Payload codecs: what a collective's payload is, and how it becomes bytes and back.

A schema (any type msgspec can decode, or ``numpy.ndarray`` and numpy scalar types) resolves
once into a :class:`SchemaInfo`: display name, structural fingerprint and a reusable msgspec
decoder. Arrays travel in their own self-describing format; nesting is bounded so that every
rank decodes a payload alike; reductions combine in rank order. Nothing here pickles.
"""

from .array import array_fingerprint, decode_array, encode_array
from .hooks import decides_from_fields
from .nesting import MAX_NESTING, nesting_ok
from .reduce import ARRAY_REDUCE, SCALAR_REDUCE, check_operands, reduce_values
from .schema import (ENCODER, FINGERPRINT_SIZE, KIND_ARRAY, KIND_MSGSPEC, KIND_NUMPY_SCALAR,
                     SchemaInfo, canonical, class_path, find_class, render_name, resolve)

__all__ = [
    "ARRAY_REDUCE", "ENCODER", "FINGERPRINT_SIZE", "KIND_ARRAY", "KIND_MSGSPEC",
    "KIND_NUMPY_SCALAR", "MAX_NESTING", "SCALAR_REDUCE", "SchemaInfo", "array_fingerprint",
    "canonical", "check_operands", "class_path", "decides_from_fields", "decode_array",
    "encode_array", "find_class",
    "nesting_ok", "reduce_values", "render_name", "resolve",
]
