"""Phase 2 and decoding: from what the exchange delivered to every rank's typed values.

Phase 2 moves what the exchange did not carry: payloads that overflowed their slot (an
allgatherv of exactly the overflowing bytes, counts read from headers every rank has seen; a
bcast of a root's bytes) and the payloads of ops that move them on a rooted backend collective
after a REDUCE exchange. Every rank derives the same counts from the same bytes, so every rank
joins the same backend operations.

Decoding is typed (msgspec decoders built once; numpy arrays in their own format), never pickle,
and gives the same verdict on every rank that decodes a payload: nesting is checked against a
fixed limit from the bytes alone, a RecursionError from a deep caller is retried on a fresh
stack, and whatever else the decoder or a user type raises (``__post_init__``, a ``ValueError``)
becomes the one error every rank raises. A user hook may judge alike bytes differently on two
ranks: ``settle`` then makes every rank raise.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, List, Optional, Tuple

from ..codecs import (KIND_MSGSPEC, KIND_NUMPY_SCALAR, SchemaInfo, decode_array, find_class,
                      nesting_ok, resolve)
from ..codecs.array import decode_array_view
from ..codecs.nesting import MAX_NESTING
from .transport import TransportTimeout
from . import array_slots, verdict
from .verdict import where
from .call import Call
from .errors import DecodeError
from .plumbing import register_internal
from .wire import (FLAG_OVERFLOW, FLAG_SPLIT_ARRAY, FLAGS_OFFSET, HEADER_SIZE, LENGTH_OFFSET,
                   SCHEMA_OFFSET, block_flags, block_length)

if TYPE_CHECKING:
    from .protocol import Protocol



def _corrupt_length(p: "Protocol", call: Call, rank: int, n: int) -> DecodeError:
    return DecodeError(f"{where(p, call)}: rank {rank}'s envelope claims "
                       f"{n} inline payload bytes, expected at most {p.slot - HEADER_SIZE}",
                       seq=call.seq, comm=p.name, source=rank, schema=call.schema_name)


def lengths(p: "Protocol") -> List[int]:
    """Every rank's payload length, from the gathered headers."""
    slot, recv = p.slot, p.recv
    return [int.from_bytes(recv[r * slot + LENGTH_OFFSET:r * slot + HEADER_SIZE], "little")
            for r in range(p.size)]


class SplitArray:
    """An array that arrived in two parts: its dtype-and-shape prefix (from its slot) and its
    bare data (a view of this call's own phase-2 buffer)."""

    __slots__ = ("prefix", "data")

    def __init__(self, prefix: bytes, data: Any) -> None:
        self.prefix = prefix
        self.data = data

    def __len__(self) -> int:
        return len(self.prefix) + len(self.data)


def gathered(p: "Protocol", call: Call) -> List[Any]:
    """Every rank's payload after a GATHER exchange: inline views, and the overflowing ones."""
    out = _collect(p, call, lambda counts: p.transport.allgatherv(call.overflow or b"", counts,
                                                                 call.deadline), None)
    assert out is not None
    return out


def gathered_to(p: "Protocol", call: Call, root: int) -> Optional[List[Any]]:
    """Every rank's payload after a GATHER exchange, on ``root`` only (None elsewhere)."""
    return _collect(p, call, lambda counts: p.transport.gatherv(call.overflow or b"", counts,
                                                               root, call.deadline), root)


def _collect(p: "Protocol", call: Call, move: Any, root: Optional[int]) -> Optional[List[Any]]:
    """The payloads of the gathered slots; ``move(counts)`` brings the overflowing ones."""
    slot, recv = p.slot, p.recv
    sizes = lengths(p)
    overflowed = [bool(recv[r * slot + FLAGS_OFFSET] & FLAG_OVERFLOW) for r in range(p.size)]
    extra: Any = None
    if any(overflowed):
        try:
            extra = move([n if o else 0 for n, o in zip(sizes, overflowed)])
        except TransportTimeout:
            verdict.timed_out(p, call)
    if root is not None and p.rank != root:
        return None
    out: List[Any] = []
    offset = 0
    for r in range(p.size):
        if overflowed[r]:
            data = memoryview(extra)[offset:offset + sizes[r]]
            offset += sizes[r]
            if recv[r * slot + FLAGS_OFFSET] & FLAG_SPLIT_ARRAY:
                start = r * slot + HEADER_SIZE
                n = 2 + int.from_bytes(recv[start:start + 2], "little")
                if n > slot - HEADER_SIZE:
                    raise _corrupt_length(p, call, r, n)
                out.append(SplitArray(bytes(recv[start:start + n]), data))
            else:
                out.append(data)
            continue
        if sizes[r] > slot - HEADER_SIZE:
            raise _corrupt_length(p, call, r, sizes[r])
        start = r * slot + HEADER_SIZE
        out.append(p.recv_view[start:start + sizes[r]])
    return out


def equal_split_arrays(call: Call, bufs: List[Any]) -> Optional[List[Any]]:
    """Every rank's array, where every rank split an array of one dtype and shape (the steady
    state of large arrays): phase 2 put their data one after another into one buffer, which is
    split at once (``array_slots.decode_equal``). None where each payload must be decoded."""
    first = bufs[0] if bufs else None
    if not isinstance(first, SplitArray) or call.array_meta is None or call.same_shape:
        return None
    whole = first.data.obj  # phase 2's receive buffer, which every SplitArray's data views
    n = len(first.data)
    if memoryview(whole).nbytes != n * len(bufs):
        return None
    for buf in bufs:
        if not isinstance(buf, SplitArray) or buf.prefix != first.prefix or \
                len(buf.data) != n or buf.data.obj is not whole:
            return None
    try:
        return array_slots.decode_equal(call.array_meta[1], first.prefix, whole, len(bufs))
    except Exception:  # untrusted bytes: decoding them one by one reaches the agreed verdict
        return None


def root_payload(p: "Protocol", call: Call, root: int) -> Any:
    """The root's payload after a REDUCE exchange (a bcast's): inline, or broadcast now."""
    n = block_length(p.block)
    if not block_flags(p.block) & FLAG_OVERFLOW:
        if n > p.slot - HEADER_SIZE:
            raise _corrupt_length(p, call, root, n)
        return p.recv_view[HEADER_SIZE:HEADER_SIZE + n]
    buf = bytearray(call.overflow) if p.rank == root and call.overflow is not None \
        else bytearray(n)
    try:
        p.transport.bcast_bytes(buf, root, call.deadline)
    except TransportTimeout:
        verdict.timed_out(p, call)
    return buf


def split_path(p: "Protocol", call: Call, buf: Any, source: int) -> Tuple[str, Any]:
    """A rooted payload's class path and the encoded value after it."""
    view = memoryview(buf)
    if not len(view):
        raise DecodeError(f"{where(p, call)}: rank {source}'s payload is "
                          f"empty, expected a class path and a value", seq=call.seq,
                          comm=p.name, source=source, schema=call.schema_name)
    n = view[0]
    return bytes(view[1:1 + n]).decode(errors="replace"), view[1 + n:]


def resolve_wild(p: "Protocol", call: Call, path: str) -> Tuple[Optional[SchemaInfo], str]:
    """The root's schema, found by the class path it sent: (info, "") or (None, error text).

    Verified against the fingerprint every rank agreed on, so a same-named class of another
    shape is never decoded as if it were the root's.
    """
    agreed_fp = bytes(p.block[SCHEMA_OFFSET:SCHEMA_OFFSET + 8])
    if not path:
        return None, ("DecodeError: expected the root's schema to be a class importable by "
                      "module and name, got one that is not (a typing construct such as "
                      "Optional[T], or a class defined inside a function); pass schema= on "
                      "every rank")
    try:
        info = resolve(find_class(path))
    except (LookupError, TypeError) as exc:
        return None, f"DecodeError: {exc}"
    if info.fingerprint != agreed_fp:
        return None, (f"DecodeError: expected {path} with the root's structure "
                      f"({agreed_fp.hex()[:8]}), got a class of another structure "
                      f"({info.fingerprint.hex()[:8]}) on this rank; pass schema=")
    return info, ""


def decode(p: "Protocol", call: Call, buf: Any, source: int,
           info: Optional[SchemaInfo] = None) -> Any:
    """``buf`` from ``source`` as ``info`` (default: the call's schema), or the agreed error."""
    info = info if info is not None else call.info
    assert info is not None  # the exchange raised for every rank whose schema did not resolve
    try:
        if info.kind == KIND_MSGSPEC:
            if isinstance(buf, SplitArray):  # an array where the schema wants a message
                raise ValueError("expected a msgpack payload, got an array's data")
            if len(buf) > MAX_NESTING and info.needs_nesting_scan and not nesting_ok(buf):
                raise ValueError(f"expected a payload nested at most {MAX_NESTING} deep, got "
                                 f"one nested deeper")
            return verdict.decode_any(info, buf)
        if isinstance(buf, SplitArray):
            arr = decode_array_view(buf.prefix, buf.data)
        else:
            arr = decode_array(buf)
        # The envelope's array fingerprint was checked equal on every rank; a payload whose own
        # dtype (or shape, where the op combines values) contradicts it is corrupt.
        meta = call.array_meta
        if meta is not None and (arr.dtype.str != meta[1] or
                                 (call.same_shape and arr.shape != tuple(meta[0]))):
            raise ValueError(f"expected the envelope's dtype and shape, got {arr.dtype} "
                             f"{arr.shape}")
        return arr[()] if info.kind == KIND_NUMPY_SCALAR else arr
    except Exception as exc:  # untrusted bytes: whatever the decoder or a user type raises
        raise verdict.decode_failure(p, call, source, exc, info) from exc


register_internal(__file__)
