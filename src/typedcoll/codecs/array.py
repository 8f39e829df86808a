"""The numpy array payload: self-describing bytes for ``numpy.ndarray`` schemas.

A payload is: u16 little-endian length of a msgpack prefix, the prefix (dtype string, shape),
then the raw C-order bytes. The prefix makes the payload self-describing, so ranks that did not
know the shape (non-roots of bcast) can rebuild it; the envelope carries
:func:`array_fingerprint` of dtype and shape, so ranks that disagree never get this far.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple, cast

import math

import msgspec
import numpy as np

from .digest import digest8



_ARRAY_META = msgspec.msgpack.Decoder(Tuple[str, Tuple[int, ...]])
_META_ENCODER = msgspec.msgpack.Encoder()

_ARRAY_FP_CACHE: Dict[Tuple[str, Optional[Tuple[int, ...]]], bytes] = {}


def array_fingerprint(dtype_str: str, shape: Optional[Tuple[int, ...]]) -> bytes:
    """The envelope's fingerprint of an array's dtype, and of its shape where the op needs
    every rank's to be equal (None: the dtype alone)."""
    key = (dtype_str, shape)
    fp = _ARRAY_FP_CACHE.get(key)
    if fp is None:
        if len(_ARRAY_FP_CACHE) > 4096:
            _ARRAY_FP_CACHE.clear()
        fp = _ARRAY_FP_CACHE[key] = digest8(f"{dtype_str}{shape}")
    return fp


def array_prefix(dtype_str: str, shape: Tuple[int, ...]) -> bytes:
    """The payload's prefix: u16 length, then msgpack (dtype string, shape)."""
    meta = _META_ENCODER.encode((dtype_str, shape))
    return len(meta).to_bytes(2, "little") + meta


def encode_array(arr: np.ndarray) -> bytes:
    if arr.dtype.hasobject:
        raise TypeError(f"expected an array of plain numbers, got dtype {arr.dtype}")
    return array_prefix(arr.dtype.str, arr.shape) + np.ascontiguousarray(arr).tobytes()


def encode_array_split(arr: np.ndarray) -> Tuple[bytes, memoryview]:
    """(prefix, data): the payload in two parts, for payloads that move in phase 2 anyway."""
    if arr.dtype.hasobject:
        raise TypeError(f"expected an array of plain numbers, got dtype {arr.dtype}")
    return array_prefix(arr.dtype.str, arr.shape), array_data(arr)


def array_data(arr: np.ndarray) -> memoryview:
    """The array's bytes in C order: its own memory where it is C-contiguous (no copy)."""
    return memoryview(cast(Any, np.ascontiguousarray(arr).reshape(-1).view(np.uint8)))


def decode_array(buf: Any) -> np.ndarray:
    """The array in ``buf``; ValueError for anything that is not a well-formed array payload.

    The prefix comes from a peer, so it is checked before numpy sees it: ``np.dtype`` of an
    arbitrary string can raise SyntaxError (it parses "(2,)i4"-style strings with ast), and an
    int64 product of the shape can overflow or wrap.
    """
    view = memoryview(buf)
    n = int.from_bytes(view[:2], "little")
    return _array_over(view[:2 + n], view[2 + n:]).copy()


def decode_array_view(prefix: Any, data: Any) -> np.ndarray:
    """The array of a split payload, over ``data`` itself: no copy (``data`` is a buffer of
    this call's own, which no later collective reuses)."""
    return _array_over(memoryview(prefix), memoryview(data))


def read_prefix(prefix: bytes) -> Tuple[np.dtype, Tuple[int, ...], int]:
    """(dtype, shape, data bytes) of a payload's whole prefix; ValueError where it is not a
    well-formed one."""
    meta = _META_CACHE.get(prefix)
    if meta is None:
        meta = _parse_meta(memoryview(prefix))
        if len(_META_CACHE) > 4096:
            _META_CACHE.clear()
        _META_CACHE[prefix] = meta
    return meta


def _array_over(prefix: memoryview, data: memoryview) -> np.ndarray:
    dtype, shape, expected = read_prefix(bytes(prefix))
    if len(data) != expected:
        raise ValueError(f"expected {expected} bytes of {dtype.str} data for shape {shape}, "
                         f"got {len(data)}")
    return np.frombuffer(data, dtype=dtype).reshape(shape)


# A prefix's checked reading, by its bytes: a steady stream of one shape reads it once.
_META_CACHE: Dict[bytes, Tuple[np.dtype, Tuple[int, ...], int]] = {}


def _parse_meta(prefix: memoryview) -> Tuple[np.dtype, Tuple[int, ...], int]:
    n = int.from_bytes(prefix[:2], "little")
    dtype_str, shape = _ARRAY_META.decode(prefix[2:2 + n])
    try:
        dtype = np.dtype(dtype_str)
    except Exception as exc:  # numpy raises TypeError, ValueError or SyntaxError here
        raise ValueError(f"expected a numpy dtype string, got {dtype_str!r}") from exc
    if dtype.hasobject:
        raise ValueError(f"expected an array of plain numbers, got dtype {dtype}")
    if any(d < 0 for d in shape):
        raise ValueError(f"expected a shape of sizes >= 0, got {shape}")
    return dtype, shape, math.prod(shape) * dtype.itemsize
