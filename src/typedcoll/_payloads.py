"""Phase 2 and decoding: turning the slots phase 1 received into every rank's value.

``Payloads`` is the half of :class:`~typedcoll._protocol.Protocol` that runs after the envelope
check: the overflow collective whose counts every rank reads from the headers (an allgatherv,
a gatherv to the root, a bcast of the root's bytes, a plain allreduce of an array), then typed
decoding, where a payload that does not decode becomes the error every rank agrees on.
"""

from __future__ import annotations

import operator
from typing import TYPE_CHECKING, Any, List, Optional

import numpy as np

from . import _coldpath, codecs
from ._callsite import register_internal
from ._errors import DecodeError
from .codecs import KIND_MSGSPEC, KIND_NUMPY_SCALAR, SchemaInfo
from ._transport import TransportTimeout
from ._wire import FLAG_OVERFLOW, HEADER_SIZE

# How a contribution travels: msgspec-encoded, as a numpy array, or not at all (a barrier, the
# non-roots of bcast).
MODE_MSG, MODE_ARRAY, MODE_EMPTY = 0, 1, 2

if TYPE_CHECKING:
    from ._protocol import Protocol

_ZEROS = bytes(8)
_ARRAY_REDUCE = {"sum": np.add, "prod": np.multiply, "max": np.maximum, "min": np.minimum}
_SCALAR_REDUCE = {"sum": operator.add, "prod": operator.mul, "max": max, "min": min}


class Phase1:
    """What phase 1 left for phase 2: every rank's flags and lengths, own overflow, deadline.

    ``lengths`` is read from the received headers on first use: building a list of N ints is
    per-rank Python work that the envelope check itself does not need.
    """

    __slots__ = ("seq", "flags", "_lengths", "overflow", "deadline", "info", "op", "_protocol")

    def __init__(self, seq: int, flags: bytearray, lengths: Optional[List[int]],
                 overflow: Optional[bytes], deadline: Optional[float],
                 info: Optional[SchemaInfo], op: str, protocol: Optional["Protocol"] = None) -> None:
        self.seq = seq
        self.flags = flags
        self._lengths = lengths
        self.overflow = overflow
        self.deadline = deadline
        self.info = info
        self.op = op
        self._protocol = protocol

    @property
    def lengths(self) -> List[int]:
        if self._lengths is None:
            assert self._protocol is not None  # set whenever lengths are deferred
            self._lengths = self._protocol._lengths()
        return self._lengths


class Payloads:
    """Phase 2 and decoding, mixed into Protocol (which holds the state these methods read)."""

    __slots__ = ()
    # Declared for readers and type checkers; Protocol's slots provide them.
    rank: int
    size: int
    name: str
    slot: int
    recv_view: memoryview
    send_view: memoryview
    transport: Any
    _site: Any

    def _corrupt_length(self, seq: int, op: str, info: Any, rank: int, n: int) -> DecodeError:
        return DecodeError(f"collective #{seq} on {self.name}: rank {rank}'s envelope claims "
                           f"{n} inline payload bytes, expected at most "
                           f"{self.slot - HEADER_SIZE}", seq=seq, comm=self.name, source=rank,
                           schema=info.name if info is not None else "?")

    # --- phase 2 and decoding ---------------------------------------------------------------
    def gather_payloads(self, p1: Phase1, root: Optional[int] = None) -> Optional[List[Any]]:
        """Every rank's payload (on every rank, or on ``root`` only when given: None elsewhere)."""
        flags, lengths = p1.flags, p1.lengths
        overflowed = [bool(f & FLAG_OVERFLOW) for f in flags]
        extra = None
        if any(overflowed):
            counts = [n if o else 0 for n, o in zip(lengths, overflowed)]
            own = p1.overflow or b""
            try:
                if root is None:
                    extra = self.transport.allgatherv(own, counts, p1.deadline)
                else:
                    extra = self.transport.gatherv(own, counts, root, p1.deadline)
            except TransportTimeout:
                _coldpath.timed_out(self, p1.seq, p1.op, p1.info, *self._site)
        if root is not None and self.rank != root:
            return None
        out: List[Any] = []
        offset = 0
        for r in range(self.size):
            if overflowed[r]:
                out.append(memoryview(extra)[offset:offset + lengths[r]])  # type: ignore[arg-type]
                offset += lengths[r]
            else:
                out.append(self._inline(p1, r))
        return out

    def _inline(self, p1: Phase1, rank: int) -> memoryview:
        n = p1.lengths[rank]
        if n > self.slot - HEADER_SIZE:
            raise self._corrupt_length(p1.seq, p1.op, p1.info, rank, n)
        offset = rank * self.slot + HEADER_SIZE
        return self.recv_view[offset:offset + n]

    def bcast_payload(self, p1: Phase1, root: int) -> Any:
        if not p1.flags[root] & FLAG_OVERFLOW:
            return self._inline(p1, root)
        buf = bytearray(p1.overflow) if self.rank == root else bytearray(p1.lengths[root])  # type: ignore[arg-type]
        try:
            self.transport.bcast_bytes(buf, root, p1.deadline)
        except TransportTimeout:
            _coldpath.timed_out(self, p1.seq, p1.op, p1.info, *self._site)
        return buf

    def allreduce_large(self, p1: Phase1, array: np.ndarray, op: str) -> np.ndarray:
        try:
            return self.transport.allreduce_array(array, op, p1.deadline)
        except TransportTimeout:
            _coldpath.timed_out(self, p1.seq, p1.op, p1.info, *self._site)
            raise  # unreachable: timed_out raises

    def decode(self, p1: Phase1, buf: Any, source: int) -> Any:
        info = p1.info
        assert info is not None  # phase 1 raised for every rank whose schema did not resolve
        try:
            if info.kind == KIND_MSGSPEC:
                return info.decoder.decode(buf)
            arr = codecs.decode_array(buf)
            # The envelope's array fingerprint was checked equal on every rank; a payload whose
            # own dtype or shape contradicts it is corrupt (zeros: bcast, where only the root
            # knows the array, so only the payload describes it).
            expected = bytes(self.send_view[32:40])
            if expected != _ZEROS and codecs.array_fingerprint(arr.dtype.str,
                                                                arr.shape) != expected:
                raise ValueError(f"expected the envelope's dtype and shape, got {arr.dtype} "
                                 f"{arr.shape}")
            return arr[()] if info.kind == KIND_NUMPY_SCALAR else arr
        except Exception as exc:  # untrusted bytes: whatever the decoder raises (RecursionError
            # on deep nesting, UnicodeDecodeError in a str) is this payload's decode error
            raise _coldpath.decode_failure(self, p1.seq, p1.op, info, source, exc) from exc


def reduce_values(values: List[Any], op: str) -> Any:
    """Combine in rank order, so every rank computes the bitwise same result."""
    first = values[0]
    if isinstance(first, np.ndarray):
        acc = first.copy()
        ufunc = _ARRAY_REDUCE[op]
        for v in values[1:]:
            ufunc(acc, v, out=acc)
        return acc
    combine = _SCALAR_REDUCE[op]
    acc = first
    for v in values[1:]:
        acc = combine(acc, v)
    return acc


register_internal(__file__)
