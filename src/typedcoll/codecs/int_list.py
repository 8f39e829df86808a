"""The C decoder of lists of ints (``_ints.c``) for the schemas whose lists of ints msgspec
decodes to plain lists of ints; msgspec's own decoder for every other schema and payload.

msgspec creates Python ints from a msgpack array of integers no faster than pickle does (48-60
us for 2,048 token ids as ``list[int]`` on the development VM, where ``_ints`` takes 33): it
parses such an array directly and hands any other payload, malformed ones included, to
msgspec, so results and errors stay msgspec's.
``TYPEDCOLL_PURE_PYTHON=1`` turns it off with the other C code: msgspec then decodes every
payload, which is how the tests hold both to the same results.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Optional

import msgspec.inspect as mi

_Decode = Callable[[Any], Any]


def _load() -> Optional[Callable[[_Decode], _Decode]]:
    if os.environ.get("TYPEDCOLL_PURE_PYTHON"):
        return None
    try:
        from ._ints import int_list_decoder  # type: ignore  # C extension, no stub
    except ImportError:  # built without a compiler: msgspec decodes every payload
        return None
    loaded: Callable[[_Decode], _Decode] = int_list_decoder
    return loaded


_int_list_decoder = _load()
ENABLED = _int_list_decoder is not None


def faster_decode(type_info: mi.Type, decode: _Decode) -> Optional[_Decode]:
    """A faster twin of msgspec's ``decode`` for the schema ``type_info``, or None: none."""
    if _int_list_decoder is None or not _plain_int_list(type_info):
        return None
    return _int_list_decoder(decode)


def _plain_int_list(t: mi.Type) -> bool:
    """Whether msgspec decodes a msgpack array of integers as ``t`` to a list of those ints
    (``Any``, or a ``list[int]`` with no constraint to check on the list or its items)."""
    if isinstance(t, mi.AnyType):
        return True
    if not isinstance(t, mi.ListType) or t.min_length is not None or t.max_length is not None:
        return False
    item = t.item_type
    return type(item) is mi.IntType and all(
        bound is None for bound in (item.gt, item.ge, item.lt, item.le, item.multiple_of))
