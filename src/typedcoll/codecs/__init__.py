"""Payload codecs: what a collective's payload is, and how it becomes bytes and back.

A schema (any type msgspec can decode, or ``numpy.ndarray`` and numpy scalar types) resolves
once into a :class:`SchemaInfo`: display name, structural fingerprint and a reusable msgspec
decoder. Arrays travel in their own self-describing format. Nothing here pickles.
"""

from ._array import array_fingerprint, decode_array, encode_array
from ._schema import (ENCODER, FINGERPRINT_SIZE, KIND_ARRAY, KIND_MSGSPEC, KIND_NUMPY_SCALAR,
                      SchemaInfo, canonical, render_name, resolve)

__all__ = [
    "ENCODER", "FINGERPRINT_SIZE", "KIND_ARRAY", "KIND_MSGSPEC", "KIND_NUMPY_SCALAR", "SchemaInfo",
    "array_fingerprint", "canonical", "decode_array", "encode_array", "render_name", "resolve",
]
