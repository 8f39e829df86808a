"""The wire form of a self-describing value (``compat.values`` describes it): extension codes,
flags, and reading the flags without decoding the value.

Shared by both sides: ``tagging`` writes this form, ``untagging`` reads it back.
"""

from __future__ import annotations

import struct
from typing import Any

from msgspec.msgpack import Ext

from ..core.plumbing import register_internal

# Extension codes. Containers are lists whose first item is an empty marker; leaves carry data.
ROOT, TUPLE, SET, FROZENSET, DICT, CLASS, EXT, NAMED_TUPLE = 16, 17, 18, 19, 20, 21, 22, 23
ARRAY, NUMPY_SCALAR, COMPLEX, BIG_INT, BYTEARRAY, TORCH_DTYPE, TORCH_SIZE = 24, 25, 26, 27, 28, \
    29, 30
NODES = frozenset((TUPLE, SET, FROZENSET, DICT, CLASS, EXT, NAMED_TUPLE))

HAS_CLASSES = 1  # this value holds class instances
CALL_HAS_CLASSES = 2  # some value of this call does (stamped on every part a rank scatters)

COMPLEX_PAIR = struct.Struct("<dd")
SIZE_ITEM = struct.Struct("<q")
# The msgpack bytes that start a tagged value: a 2-array, then a fixext1 with the ROOT code.
_TAGGED_PREFIX = bytes((0x92, 0xD4, ROOT))


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
    """Whether any of the decoded payloads needs ``decode`` (most calls: none)."""
    for tree in trees:
        if type(tree) is list and len(tree) == 2 and type(tree[0]) is Ext:
            return True
    return False


register_internal(__file__)
