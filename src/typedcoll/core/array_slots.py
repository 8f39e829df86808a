"""Numpy arrays on the C fast path: allgather of arrays, inline and past the slot.

The C path runs the protocol's steps for these calls (identity, header, exchange, verdict, the
flight recorder) and leaves the array's own format to this module, which writes and reads it
exactly as the Python steps do (``codecs.array``):

  encode   the payload ``encode_array`` writes (u16 prefix length, msgpack (dtype, shape), the
           C-order bytes) and the envelope's array fingerprint of an allgather (dtype only:
           ranks may contribute arrays of different shapes);
  decode   the steady state of a control plane, where every rank sent the same prefix (one
           dtype, one shape): the C path checks that the prefixes are equal and copies the
           data regions behind each other into one buffer; the prefix is read once and the
           buffer split into one array per rank (views of that one fresh buffer, each its own
           rank's, writable like the Python steps' copies).
  past the slot  an array larger than the slot sends its prefix inline and its data in phase
           2, as the Python steps split it (``encode_array_split``). Where every rank split an
           array of one dtype and shape and the communicator has no timeout, the C path runs
           phase 2 itself, as ``MPITransport.allgatherv`` would (one blocking ``MPI_Allgather``,
           which a Python rank's call matches), into a receive buffer it reuses once no result
           refers to it, and splits that buffer the same way; otherwise the Python steps run
           phase 2 after the C path's exchange.

Anything else (an object dtype, arrays of different shapes, a prefix that does not decode, a
dtype the envelope contradicts, a 0-d or empty array) is the Python steps', which reach the
verdict every rank reaches from the same bytes: ``encode`` returns None before anything is
sent; after the exchange the C path resumes the call in Python where the prefixes differ, and
``decode_equal`` returns None (or raises) where it does not decode them exactly as they would.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np

from ..codecs.array import array_data, array_fingerprint, array_prefix, read_prefix
from .plumbing import register_internal
from .wire import MAX_PAYLOAD

Decoder = Callable[[bytes, Any, int], Optional[List[np.ndarray]]]
# (dtype.str, shape) -> (payload prefix, array fingerprint, decoder); bounded like codecs' caches
_ENCODED: Dict[Tuple[str, Tuple[int, ...]], Tuple[bytes, bytes, Decoder]] = {}
_MAX_ENTRIES = 4096


def encode(arr: np.ndarray, cap: int) -> Optional[Tuple[bytes, bytes, Decoder, Any]]:
    """What the C path writes into a slot of ``cap`` payload bytes, as the Python steps would:
    (inline bytes, array fingerprint, decoder of equal slots, None), or for an array larger
    than the slot, (prefix, fingerprint, decoder, the data phase 2 moves: the array's own memory
    where it is C-contiguous); None where the Python steps must encode ``arr`` (they flag what
    cannot be sent)."""
    dtype = arr.dtype
    if dtype.hasobject:
        return None
    key = (dtype.str, arr.shape)
    entry = _ENCODED.get(key)
    if entry is None:
        entry = _entry(key)
        if len(_ENCODED) >= _MAX_ENTRIES:
            _ENCODED.clear()
        _ENCODED[key] = entry
    if entry is _REFUSED:
        return None
    prefix = entry[0]
    nbytes = arr.nbytes
    if nbytes > cap:
        if nbytes > MAX_PAYLOAD or len(prefix) > cap:
            return None
        return prefix, entry[1], entry[2], array_data(arr)
    if len(prefix) + nbytes > cap:
        return None
    return prefix + arr.tobytes(), entry[1], entry[2], None


def _entry(key: Tuple[str, Tuple[int, ...]]) -> Tuple[bytes, bytes, Decoder]:
    """(prefix, array fingerprint, decoder) of arrays of ``key``'s dtype and shape, or
    ``_REFUSED`` where ``decode_equal`` would not split that prefix's data: a dtype whose string
    reads back as another (as numpy's user dtypes can), or a 0-d array (one of a large void
    dtype can pass the slot). The Python steps must serve those, since the C path runs phase 2
    before it decodes and cannot hand the call over afterwards. Every rank that sent the same
    prefix reaches the same answer."""
    prefix = array_prefix(*key)
    try:
        dtype, shape, expected = read_prefix(prefix)
        ok = dtype.str == key[0] and shape == key[1] and len(shape) > 0
    except Exception:  # a dtype string numpy will not read back: the Python steps say so
        ok = False
    if not ok:
        return _REFUSED
    return prefix, array_fingerprint(key[0], None), partial(decode_equal, key[0])


_REFUSED: Tuple[bytes, bytes, Decoder] = (b"", b"", lambda prefix, data, size: None)


def decode_equal(dtype_str: str, prefix: bytes, data: Any,
                 size: int) -> Optional[List[np.ndarray]]:
    """``size`` arrays from ``data`` (every rank's data in rank order, each after the one
    ``prefix``), of dtype ``dtype_str`` (what the envelopes agreed on); None where the Python
    steps must judge the payloads."""
    dtype, shape, expected = read_prefix(prefix)
    if dtype.str != dtype_str or not shape or not expected or len(data) != size * expected:
        return None
    return list(np.frombuffer(data, dtype).reshape((size,) + shape))


register_internal(__file__)
