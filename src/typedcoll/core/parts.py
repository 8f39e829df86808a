"""The collectives whose payload is one value per destination rank: scatter, alltoall and
reduce_scatter.

The root (scatter) or every rank (alltoall) encodes and checks each value on its own side and
packs the encoded parts into one payload::

    u32 count (the communicator's size), count x u32 end offsets, then the parts, in rank order

(little-endian). The payload rides in the exchange itself when it fits the slot: a scatter's
REDUCE exchange carries the root's payload to every rank, as a bcast's does; an alltoall up to
``GATHER_DIRECT_MAX`` ranks is a GATHER exchange, so every rank holds every rank's parts. Each
rank checks every packed payload's framing (the same bytes everywhere, so a bad one fails on
every rank) and decodes its own parts. A payload that does not fit its slot (the agreement
block's overflow flag, alike on every rank), and an alltoall beyond GATHER_DIRECT_MAX ranks,
move the parts on the backend's own scatter or all-to-all after the exchange instead, so no
rank receives the parts of others. Inline parts count toward the slot-size rule like any
inline payload (``core/wire.py``): a scatter of N parts weighs what a bcast of all of them
weighs, and a slot grown for them serves every later collective until it shrinks back. A
receiver of ``scatter`` without ``schema=`` takes the root's class, as in ``bcast``. The C
fast path serves the steady state of scatter and alltoall (parts that fit, schemas it knows)
with this same packing.
"""

from __future__ import annotations

import functools
import struct
from itertools import accumulate
from typing import Any, List, Optional, Sequence, Tuple

import numpy as np

from ..codecs import SchemaInfo, array_fingerprint, check_operands, reduce_values
from . import fast, payloads, verdict
from .args import check_reduce_op, check_root, first_error, payload_mode, schema_of
from .call import MODE_BYTES, MODE_EMPTY, MODE_MSG, Call
from .plumbing import register_internal
from .ops import _ZEROS, GATHER_DIRECT_MAX, _common, _from_root, run_after_fast
from .protocol import Protocol
from .transport import TransportTimeout, inline_length
from .wire import (FLAG_OVERFLOW, FLAGS_OFFSET, GATHER, HEADER_SIZE, LENGTH_OFFSET, NO_ROOT,
                   REDUCE, REDUCE_OP_NAMES, block_flags)


# --- scatter -----------------------------------------------------------------------------------
def scatter(p: Protocol, values: Any, root: Any, schema: Any, step: Any, name: Any,
            out: Any = None) -> Any:
    """``out``: the C path's answer where the caller already ran it (TypedComm), else None."""
    if out is None:
        out = fast.rooted(p, values, schema, step, name, "scatter", root)
        if out.__class__ is list:
            return out[0]
    sent = out is not fast.TAKE_PY  # the C path encoded, checked and sent the parts
    root_error = check_root(root, p.size)
    is_root = root_error is None and p.rank == root
    step, name, common_error = _common(step, name)
    parts: Optional[List[bytes]] = None
    interrupt: Optional[BaseException] = None
    error = first_error(root_error, common_error)
    info: Optional[SchemaInfo] = None
    wild = not is_root and schema is None
    if is_root:
        values = _held(values)
        if not isinstance(values, Sequence) or isinstance(values, (str, bytes)) \
                or len(values) != p.size:
            error = error or _count_error(values, p.size, " on the root")
        else:
            info, schema_error = schema_of(values[0], schema)
            error = error or schema_error
            if error is None and info is not None and not sent:
                parts, error, interrupt = _encode_parts(p, info, values, "scatter",
                                                        schema is None)
    elif not wild:
        info, schema_error = schema_of(None, schema)
        error = error or schema_error
    call = Call("scatter", REDUCE, info, MODE_EMPTY if parts is None else MODE_BYTES,
                None if parts is None else pack(parts, p.policy.max_slot),
                root=NO_ROOT if root_error else int(root), step=step, name=name, wild=wild,
                error=error)
    call.inline = True
    call.interrupt = interrupt

    def rest(c: Call) -> Any:
        if not block_flags(p.block) & FLAG_OVERFLOW:
            packed = payloads.root_payload(p, c, c.root)
            return _from_root(p, c, unpack(p, c, packed, c.root)[p.rank], c.root)
        try:
            mine = p.transport.scatter_parts(_parts_sent(p, c) if sent and is_root else parts,
                                             c.root, c.deadline)
        except TransportTimeout:
            verdict.timed_out(p, c)
        return _from_root(p, c, mine, c.root)
    return run_after_fast(p, out, call, rest)


def _count_error(values: Any, size: int, where: str = "") -> str:
    """The error for ``values`` that are not one value per rank: how many were given, for a
    sequence, since a list one short reads like a list of the right length."""
    got = type(values).__name__
    if isinstance(values, Sequence) and not isinstance(values, (str, bytes)):
        got = f"a {got} of {len(values)}"
    return f"ValueError: expected a sequence of {size} values{where}, one per rank, got {got}"


def pack(parts: List[bytes], max_slot: int) -> bytes:
    """Encoded parts as one payload (the module docstring's format); parts too large for even
    the largest slot (``max_slot``, the communicator's) are not copied together: a marker one
    byte too long for it stands in, so the header flags the overflow, the slot does not grow for
    it, and the parts move in phase 2 as they are."""
    ends = list(accumulate(len(x) for x in parts))
    largest_inline = max_slot - HEADER_SIZE
    if 4 + 4 * len(parts) + (ends[-1] if ends else 0) > largest_inline:
        return _overflow_mark(largest_inline + 1)
    return struct.pack(f"<{len(parts) + 1}I", len(parts), *ends) + b"".join(parts)


@functools.lru_cache(maxsize=4)
def _overflow_mark(length: int) -> bytes:
    return bytes(length)  # only its length is read: the slot never carries it


def unpack(p: Protocol, call: Call, packed: Any, source: int) -> List[Any]:
    """Views of ``source``'s parts in ``packed``, or the DecodeError every rank raises for it."""
    view = memoryview(packed)
    n = p.size
    body = 4 + 4 * n
    if len(view) < body or int.from_bytes(view[:4], "little") != n:
        problem = f"expected {n} packed parts, got a payload of {len(view)} bytes"
    else:
        ends = struct.unpack_from(f"<{n}I", view, 4)
        starts = (0,) + ends[:-1]
        if ends[-1] == len(view) - body and all(a <= b for a, b in zip(starts, ends)):
            return [view[body + a:body + b] for a, b in zip(starts, ends)]
        problem = f"expected part offsets within its {len(view) - body} bytes, got {list(ends)}"
    raise verdict.decode_failure(p, call, source, ValueError(problem))


def _held(values: Any) -> Any:
    """A sequence's values as a plain list: the parts sent and the count checked are then the
    same ones (a sequence type whose ``len`` and iteration disagree would otherwise pass the
    count check and fail in the transport on the root alone)."""
    if isinstance(values, Sequence) and not isinstance(values, (str, bytes)) and \
            type(values) not in (list, tuple):
        return list(values)
    return values


def _encode_parts(p: Protocol, info: SchemaInfo, values: Sequence[Any], op: str,
                  inferred: bool
                  ) -> Tuple[Optional[List[bytes]], Optional[str], Optional[BaseException]]:
    """Each value encoded (and checked against the schema) on this rank: (parts, error, the
    interrupt a hook raised, which the call raises after its exchange). ``inferred``: no
    ``schema=`` was given, the schema is value 0's type."""
    parts = []
    probe = Call(op, REDUCE, info, MODE_MSG, None, validate=True)  # one record for every part
    # A value whose type is exactly a plain schema's decodes as it by construction: only other
    # values need decoding back before they are sent.
    plain = info.schema if info.schema in _PLAIN else None
    for i, v in enumerate(values):
        mode, encoded, _, mode_error = payload_mode(info, v)
        probe.mode, probe.value, probe.validate = mode, encoded, type(v) is not plain
        payload, error = p.encode(probe)
        error = mode_error or error
        if error is not None:
            kind, _, detail = error.partition(": ")
            if inferred and type(v) is not type(values[0]):
                detail += (f" (no schema= was given, so every value must be of value 0's type, "
                           f"{type(values[0]).__name__}, and value {i} is a {type(v).__name__}: "
                           f"pass a schema= that admits both, Optional[...] where some are None)")
            return None, f"{kind}: value {i}: {detail}", probe.interrupt
        parts.append(payload)
    return parts, None, None


_PLAIN = frozenset({int, float, str, bytes, bool})


# --- alltoall and reduce_scatter ------------------------------------------------------------
def alltoall(p: Protocol, values: Any, schema: Any, step: Any, name: Any) -> List[Any]:
    return _exchange_parts(p, "alltoall", values, schema, step, name)


def reduce_scatter(p: Protocol, values: Any, op: Any, schema: Any, step: Any,
                   name: Any) -> Any:
    """Rank i gets ``op`` over every rank's ``values[i]``, combined in rank order.

    Its own op in the envelope, with the reduce op and the values' dtype and shape: ranks that
    combine differently, or call alltoall meanwhile, raise instead of pairing up.
    """
    code, op_error = check_reduce_op(op)
    got = _exchange_parts(p, "reduce_scatter", values, schema, step, name, reduce_op=code,
                          error=op_error or _operands_error(values, code))
    op_name = REDUCE_OP_NAMES.get(code, "sum")
    if isinstance(got[0], np.generic):  # as 0-d arrays: wrap on overflow like MPI, no warning
        return reduce_values([np.asarray(v) for v in got], op_name)[()]
    return reduce_values(got, op_name)


def _exchange_parts(p: Protocol, op: str, values: Any, schema: Any, step: Any, name: Any, *,
                    reduce_op: int = 0, error: Optional[str] = None) -> List[Any]:
    """Each rank sends ``values[j]`` to rank j: in a GATHER exchange up to GATHER_DIRECT_MAX
    ranks when every rank's parts fit the slot, else after a REDUCE one on the backend's own
    all-to-all."""
    direct = p.size <= GATHER_DIRECT_MAX
    out = fast.allgather(p, values, schema, step, name, op) if direct and op == "alltoall" \
        else fast.TAKE_PY
    if out.__class__ is list:
        return out
    sent = out is not fast.TAKE_PY  # the C path encoded, checked and sent the parts
    step, name, common_error = _common(step, name)
    error = first_error(error, common_error)
    info: Optional[SchemaInfo] = None
    parts: Optional[List[bytes]] = None
    interrupt: Optional[BaseException] = None
    array_fp = _ZEROS
    values = _held(values)
    if not isinstance(values, Sequence) or isinstance(values, (str, bytes)) \
            or len(values) != p.size:
        error = error or _count_error(values, p.size)
    else:
        info, schema_error = schema_of(values[0], schema)
        error = error or schema_error
        if reduce_op:
            array_fp, shape_error = _column_shapes(values)
            error = error or shape_error
        if error is None and info is not None and not sent:
            parts, error, interrupt = _encode_parts(p, info, values, op, schema is None)
    packed = pack(parts, p.policy.max_slot) if direct and parts else None
    call = Call(op, GATHER if direct else REDUCE, info, MODE_EMPTY if packed is None else
                MODE_BYTES, packed, step=step, name=name, error=error, reduce_op=reduce_op,
                array_fp=array_fp)
    call.interrupt = interrupt

    def rest(c: Call) -> List[Any]:
        if direct and not block_flags(p.block) & FLAG_OVERFLOW:
            return [payloads.decode(p, c, part, r) for r, part in enumerate(_own_parts(p, c))]
        try:
            got = p.transport.alltoall_parts(_parts_sent(p, c) if sent else parts, c.deadline)
        except TransportTimeout:
            verdict.timed_out(p, c)
        return [payloads.decode(p, c, buf, r) for r, buf in enumerate(got)]
    return run_after_fast(p, out, call, rest)  # type: ignore[no-any-return]


def _parts_sent(p: Protocol, call: Call) -> List[bytes]:
    """This rank's parts as the C path packed them into its slot, for phase 2 where another
    rank's parts overflowed, rather than encoded and checked a second time (the C path packs no
    parts whose check runs a schema's hooks: it leaves those senders to the Python steps)."""
    n = inline_length(p.send, p.slot - HEADER_SIZE)
    return [bytes(part) for part in unpack(p, call, p.send_view[HEADER_SIZE:HEADER_SIZE + n],
                                           p.rank)]


def _own_parts(p: Protocol, call: Call) -> List[Any]:
    """This rank's part of every rank's packed payload, from the gathered slots; every packed
    payload's framing is checked, so a bad one raises on every rank."""
    slot, recv, width = p.slot, p.recv_view, p.slot - HEADER_SIZE
    mine = []
    for r in range(p.size):
        start = r * slot
        n = int.from_bytes(recv[start + LENGTH_OFFSET:start + HEADER_SIZE], "little")
        if n > width or recv[start + FLAGS_OFFSET] & FLAG_OVERFLOW:
            raise verdict.decode_failure(p, call, r, ValueError(
                f"expected at most {width} inline payload bytes, got {n}"))
        mine.append(unpack(p, call, recv[start + HEADER_SIZE:start + HEADER_SIZE + n], r)[p.rank])
    return mine


def _column_shapes(values: Sequence[Any]) -> Tuple[bytes, Optional[str]]:
    """(fingerprint, error): the dtype and shape of each value a rank reduces, in the envelope,
    so that a column whose values differ across ranks raises on every rank (numbers: zeros)."""
    arrays = [isinstance(v, (np.ndarray, np.generic)) for v in values]
    if not any(arrays):
        bad = [type(v).__name__ for v in values
               if isinstance(v, bool) or not isinstance(v, (int, float))]
        return _ZEROS, (f"TypeError: expected ints, floats, numpy scalars or arrays, got "
                        f"{bad[0]}" if bad else None)
    if not all(arrays):
        return _ZEROS, "TypeError: expected all numbers or all numpy values, got a mix"
    shapes = ";".join(f"{np.asarray(v).dtype.str}{np.shape(v)}" for v in values)
    return array_fingerprint(shapes, None), None


def _operands_error(values: Any, code: int) -> Optional[str]:
    """The error when ``code`` does not apply to one of ``values`` (bitwise ops on floats)."""
    if not code or not isinstance(values, Sequence) or isinstance(values, (str, bytes)):
        return None
    for v in values:
        kind = np.asarray(v).dtype.kind if isinstance(v, (np.ndarray, np.generic)) else (
            "f" if isinstance(v, float) else "i")
        error = check_operands(REDUCE_OP_NAMES[code], kind)
        if error:
            return error
    return None


register_internal(__file__)
