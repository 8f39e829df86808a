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

The form is written where it lives: its codes and flags in ``markers``, encoding in ``tagging``,
decoding in ``untagging``; this module is what the drop-ins import.
"""

from __future__ import annotations

from .markers import (ARRAY, BIG_INT, BYTEARRAY, CALL_HAS_CLASSES, CLASS, COMPLEX, DICT, EXT,
                      FROZENSET, HAS_CLASSES, NAMED_TUPLE, NUMPY_SCALAR, ROOT, SET, TORCH_DTYPE,
                      TORCH_SIZE, TUPLE, any_tagged, flags_of, flags_of_bytes, flags_of_slots)
from .tagging import SUPPORTED, Refused, encode, is_plain
from .untagging import Unresolved, decode

__all__ = ["ARRAY", "BIG_INT", "BYTEARRAY", "CALL_HAS_CLASSES", "CLASS", "COMPLEX", "DICT", "EXT",
           "FROZENSET", "HAS_CLASSES", "NAMED_TUPLE", "NUMPY_SCALAR", "ROOT", "SET", "SUPPORTED",
           "TORCH_DTYPE", "TORCH_SIZE", "TUPLE", "Refused", "Unresolved", "any_tagged", "decode",
           "encode", "flags_of", "flags_of_bytes", "flags_of_slots", "is_plain"]
